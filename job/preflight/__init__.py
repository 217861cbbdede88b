"""Preflight: catch, in seconds and before any download, what would kill a GPU job later.

    from job.preflight import run_preflight
    report = run_preflight(spec, ws)          # facts gathered from this machine
    report.render(); report.raise_if_failed() # EnvironmentProblem (exit 3) on any failure

Checks (each a row: check, ok/warn/fail, detail, fix): Python version; torch build and CUDA;
torch's CUDA runtime vs the driver (`cuda.py`); compute capability vs precision and the
libraries a precision / optimizer needs; peak VRAM of this spec vs free VRAM, with the
cheapest changes that would make it fit (`estimate.py`, calibrated on an H100: see
bench/RESULTS.md); host RAM (group offload keeps weights in RAM); disk for downloads, caches
and checkpoints (and the offload folder); the remote stores and their credentials
(`remotes.py`). The report is saved to `<workspace>/state/preflight.json`.
"""

from __future__ import annotations

import logging
from typing import Callable

from .estimate import EstimateInputs, Suggestion, VramEstimate, estimate_training_vram, inputs_from_spec, suggest
from .facts import DeviceFacts, GpuFacts, gather_facts
from .report import CheckRow, PreflightReport

log = logging.getLogger("trainer.preflight")

__all__ = ["CheckRow", "DeviceFacts", "EstimateInputs", "GpuFacts", "PreflightReport", "Suggestion", "VramEstimate",
           "estimate_training_vram", "gather_facts", "inputs_from_spec", "preflight_phase", "run_preflight", "spec_allows_cpu",
           "suggest"]


def spec_allows_cpu(spec, ws) -> bool:
    from .checks import spec_allows_cpu as rule

    return rule(spec, ws)


def run_preflight(spec, ws, facts: DeviceFacts | None = None, check_remotes: bool = True,
                  storage_opener: Callable | None = None, save: bool = True) -> PreflightReport:
    """Run every check for `spec` on this machine (or on injected `facts`) and return the
    report; it is also written atomically to `ws.state_dir / "preflight.json"`. Nothing is
    downloaded. `check_remotes=False` skips the network; `storage_opener(uri)` replaces
    `job.storage.open_storage` (tests)."""
    from job.report import event

    from . import checks
    from .remotes import check_remotes as probe_remotes

    if facts is None:
        extra = [ws.resolve(spec.memory.group_offload.to_disk_path)] if spec.memory.group_offload.to_disk_path else []
        facts = gather_facts(workspace=ws.root, extra_paths=extra)
    report = PreflightReport(facts=facts.to_dict())
    cpu_ok = checks.spec_allows_cpu(spec, ws)

    checks.check_python(report, facts)
    checks.check_torch(report, facts, cpu_ok=cpu_ok)
    checks.check_driver_row(report, facts)

    config, config_source = checks.transformer_config(spec, ws)
    inputs = inputs_from_spec(spec, config if config_source.endswith("config.json") else None)
    report.facts["transformer_config"] = config_source
    report.facts["transformer_params"] = inputs.params.total
    if facts.gpus:
        checks.check_precision(report, spec, facts)
        checks.check_vram(report, spec, facts, inputs)
        checks.check_cache_vram(report, spec, facts, inputs)
    elif cpu_ok:
        report.add("vram", "ok", f"not applicable: CPU smoke job ({inputs.params.total:,}-parameter model)")
    else:
        est = estimate_training_vram(inputs)
        report.add("vram", "warn", f"no GPU to compare with; this spec needs about {est.describe()}",
                   "pick a GPU with at least this much free memory", estimate=est.to_dict())

    remote = {}
    if check_remotes:
        results = probe_remotes(spec, ws, opener=storage_opener)
        checks.add_remote_rows(report, results)
        remote = {r.target.uri: r for r in results if r.status == "ok"}
    checks.check_host_ram(report, spec, facts, inputs, cpu_ok=cpu_ok)
    checks.check_disk(report, spec, ws, facts, inputs, remote)

    if save:
        try:
            report.save(ws.state_dir / "preflight.json")
        except OSError as exc:
            log.warning("could not save the preflight report: %s", exc)
    event("preflight", status=report.status, failures=[r.check for r in report.failures],
          warnings=[r.check for r in report.warnings])
    for r in report.rows:
        level = logging.ERROR if r.status == "fail" else logging.WARNING if r.status == "warn" else logging.DEBUG
        log.log(level, "%s: %s%s", r.check, r.detail, f" (fix: {r.fix})" if r.fix else "")
    return report


def preflight_phase(loaded, ws, json_output: bool = False, check_remotes: bool = True) -> PreflightReport:
    """The `trainer preflight` / first phase of `trainer run`: run, show (a rich table, or the
    JSON on stdout with `json_output`), save, and raise EnvironmentProblem (exit 3) on failure."""
    import sys

    report = run_preflight(loaded.spec, ws, check_remotes=check_remotes)
    if json_output:
        sys.stdout.write(report.to_json() + "\n")
    else:
        report.render()
    report.raise_if_failed()
    return report
