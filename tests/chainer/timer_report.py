"""Chainer's `link_hooks.TimerHook` reports on a fixed call history, for
tests/hooks.rs (`timer_reports_as_chainer_prints_them`).

    python tests/chainer/timer_report.py     # writes tests/chainer/timer_report.json

Needs chainer 7.8.1 (PyPI; numpy < 2). wgnorm's timer is keyed by hook where Chainer's
is keyed by link, so its header says `HookName` for Chainer's `LinkName` (same width).
"""
import io
import json
import os

from chainer.link_hooks import TimerHook

HISTORY = [
    ("spectral_norm", 0.0123),
    ("weight_standardization", 0.00042),
    ("spectral_norm", 0.0101),
    ("(forward)", 1.5),
    ("weight_norm", 3.2e-7),
    ("weight_standardization", 0.00051),
]

hook = TimerHook()
hook.call_history = list(HISTORY)
reports = {}
for unit in ["sec", "ms", "us", "ns", "auto", "auto_foreach"]:
    f = io.StringIO()
    hook.print_report(unit=unit, file=f)
    reports[unit] = f.getvalue()
out = {
    "history": HISTORY,
    "summary": [[k, v["elapsed_time"], v["occurrence"]] for k, v in hook.summary().items()],
    "reports": reports,
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timer_report.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print(reports["auto"])
