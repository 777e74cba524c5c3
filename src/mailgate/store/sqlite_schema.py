"""Versioned schema migrations for the SQLite store.

Each entry is applied once, in order, inside one transaction, and recorded in the
database's `PRAGMA user_version`. Never edit a released migration: append a new one.
"""

MIGRATIONS: list[str] = [
    # 1: directory, queues, messages, recipients, tracking.
    """
    CREATE TABLE config_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO config_version (id, version) VALUES (1, 0);

    CREATE TABLE directory_objects (
        guid TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        created REAL NOT NULL,
        changed REAL NOT NULL
    );
    CREATE INDEX directory_objects_kind ON directory_objects (kind, name);

    -- Unique keys of directory objects (names, domains, proxy addresses), so that two
    -- objects can never claim the same address even when written by two processes.
    CREATE TABLE directory_keys (
        key TEXT PRIMARY KEY,
        guid TEXT NOT NULL
    );
    CREATE INDEX directory_keys_guid ON directory_keys (guid);

    CREATE TABLE queues (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is an identity
        node TEXT NOT NULL,
        delivery_type TEXT NOT NULL,
        next_hop_domain TEXT NOT NULL,
        next_hop_connector TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'Ready',
        last_error TEXT,
        retry_count INTEGER NOT NULL DEFAULT 0,
        first_retry_time REAL,
        last_retry_time REAL,
        next_retry_time REAL,
        created REAL NOT NULL,
        UNIQUE (node, delivery_type, next_hop_domain, next_hop_connector)
    );

    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is an identity
        node TEXT NOT NULL,
        internet_message_id TEXT,
        from_address TEXT NOT NULL,
        subject TEXT,
        size INTEGER NOT NULL DEFAULT 0,
        date_received REAL NOT NULL,
        expiration_time REAL,
        source TEXT NOT NULL,
        source_context TEXT,
        ret TEXT,
        envid TEXT,
        is_dsn INTEGER NOT NULL DEFAULT 0
    );

    CREATE TABLE message_content (
        message_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (message_id, seq)
    );

    -- A message in a delivery queue: one row per message and next hop (bifurcation).
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is an identity
        message_id INTEGER NOT NULL,
        queue_id INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'Ready',
        token TEXT NOT NULL,
        created REAL NOT NULL,
        next_attempt REAL NOT NULL,
        retry_count INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        recovering INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until REAL
    );
    CREATE INDEX deliveries_queue ON deliveries (queue_id, status, next_attempt);
    CREATE INDEX deliveries_message ON deliveries (message_id);

    CREATE TABLE recipients (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is an identity
        message_id INTEGER NOT NULL,
        delivery_id INTEGER,
        address TEXT NOT NULL,
        original TEXT,
        orcpt TEXT,
        notify TEXT,
        mailbox TEXT,
        status TEXT NOT NULL DEFAULT 'Ready',
        last_error TEXT
    );
    CREATE INDEX recipients_delivery ON recipients (delivery_id);
    CREATE INDEX recipients_message ON recipients (message_id);

    -- Pickup files already turned into messages (file identity + content hash), kept after
    -- the message is delivered so a file that survived a crash is never submitted twice.
    CREATE TABLE pickup_seen (
        source_key TEXT PRIMARY KEY,
        created REAL NOT NULL
    );
    CREATE INDEX pickup_seen_created ON pickup_seen (created);

    CREATE TABLE tracking_events (
        id INTEGER PRIMARY KEY,
        timestamp REAL NOT NULL,
        event_id TEXT NOT NULL,
        source TEXT NOT NULL,
        message_id TEXT,
        message_id_hash INTEGER,  -- 64-bit hash of the casefolded Message-ID (see below)
        internal_message_id INTEGER,
        recipients TEXT,
        recipient_status TEXT,
        sender TEXT,
        return_path TEXT,
        subject TEXT,
        total_bytes INTEGER,
        source_context TEXT,
        connector_id TEXT,
        server_hostname TEXT,
        reference TEXT,
        related_recipient_address TEXT,
        message_info TEXT,
        directionality TEXT
    );
    CREATE INDEX tracking_events_time ON tracking_events (timestamp);
    -- Searching by Message-ID goes through a small integer hash: random Message-IDs in a
    -- text index would touch a different index page for nearly every event written.
    CREATE INDEX tracking_events_message_id ON tracking_events (message_id_hash);
    """,
    # 2: queue engine. Per delivery: an admin action waiting for an in-flight attempt to end
    # (PendingSuspend / PendingRemove), whether the delay DSN went out, and how many times
    # the node died while it was being delivered (poison detection).
    """
    ALTER TABLE deliveries ADD COLUMN pending TEXT;
    ALTER TABLE deliveries ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN crash_count INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX messages_received ON messages (date_received);
    """,
    # 3: confirmed hand-off. Messages awaiting a gateway's .ack/.nack are found through a
    # small partial index, so looking for them costs nothing when there are none.
    """
    CREATE INDEX deliveries_awaiting ON deliveries (queue_id, next_attempt)
        WHERE status = 'AwaitingConfirmation';
    """,
]
