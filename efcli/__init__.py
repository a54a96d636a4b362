"""The command lines, composed at the top: each command parses its arguments, calls the
libraries, prints, and maps errors to documented exit codes. Libraries below never print.

    ef-tune     efcli/tune.py      tuner.pipeline.tune, then reports.build.build_report
    ef-profile  efcli/profile.py   tuner.profiler.run_profile
    ef-run      efcli/run.py       expertflow.runner (prepare, build, generate)
    ef-report   efcli/report.py    reports.build.build_report
    shared      efcli/common.py    parsers, argument types, the run loop, exit codes, signals
"""
