"""The ``tessera`` subcommands, one module per command or group of commands (see ``jobs.cli``).

Each module owns its commands' options (``add_arguments``), the job config built from
them (``to_config``) and the printing of their result. Only light modules are imported
at the top of these: parsing arguments, ``--help`` and a bad-input error never wait for
numpy, faiss, torch or Ray; a command imports its job when it runs.
"""
