"""mailgate: a mail transport service modelled on Exchange 2013 transport."""

__version__ = "0.1.0"
