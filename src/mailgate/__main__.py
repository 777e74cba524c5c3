from mailgate.cli.main import cli

cli()
