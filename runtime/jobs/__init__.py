"""Job entry points: ``python -m runtime.jobs.<entry> --config <bundle>/jobs/<job>/config.json``.

Each module has ``main(argv) -> int`` built on ``runtime.jobs.common.run_job``; the shared
context, atomic outputs and exit codes are documented in ``runtime.jobs.common``.
"""
