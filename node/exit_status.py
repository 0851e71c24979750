"""The exit statuses of every `sclc-node` command, the service's and the research side's (research/cli.py)."""

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3
#: sysexits' EX_TEMPFAIL: the same command may succeed later (e.g. the database was busy).
EXIT_TRY_AGAIN = 75
