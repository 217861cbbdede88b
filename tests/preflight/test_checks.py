"""run_preflight with injected DeviceFacts: each check's ok / warn / fail and its message."""

import json

import pytest

from job.errors import EXIT_ENVIRONMENT, EnvironmentProblem
from job.preflight import PreflightReport, run_preflight

GIB = 1024 ** 3


def run(make_spec, workspace, facts, spec_kw=None, **facts_kw):
    spec = make_spec(**(spec_kw or {}))
    ws = workspace(spec)
    f = facts(**{"disk_paths": [str(ws.root)], **facts_kw})
    return run_preflight(spec, ws, facts=f, check_remotes=False), ws


def test_healthy_h100_passes_and_saves_the_report(make_spec, workspace, facts):
    report, ws = run(make_spec, workspace, facts)
    assert report.status == "ok", report.to_json()
    report.raise_if_failed()
    saved = ws.state_dir / "preflight.json"
    assert saved.is_file()
    assert PreflightReport.from_json(saved.read_text()).to_dict() == report.to_dict()
    vram = report.row("vram")
    assert "GiB" in vram.detail and "weights" in vram.detail and vram.data["estimate"]["peak_phase"]


def test_json_round_trip(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, driver_version="470.82.01", driver_cuda="11.4")
    text = report.to_json()
    again = PreflightReport.from_json(text)
    assert again.to_dict() == report.to_dict()
    data = json.loads(text)
    assert data["status"] == "fail" and {"check", "status", "detail", "fix", "data"} <= set(data["rows"][0])
    assert data["facts"]["gpus"][0]["capability"] == [9, 0]


def test_renders_as_a_table(make_spec, workspace, facts):
    from rich.console import Console

    report, _ = run(make_spec, workspace, facts)
    console = Console(record=True, width=200)
    report.render(console)
    text = console.export_text()
    assert "preflight: ok" in text and "vram" in text and "driver" in text


@pytest.mark.parametrize("version,status", [("3.9.18", "fail"), ("3.10.12", "ok"), ("3.12.3", "ok"), ("3.13.1", "warn")])
def test_python_version(make_spec, workspace, facts, version, status):
    report, _ = run(make_spec, workspace, facts, python_version=version)
    row = report.row("python")
    assert row.status == status
    if status != "ok":
        assert "3.12" in row.fix


def test_old_driver_fails_with_the_driver_to_install(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, torch_cuda="12.8", driver_version="535.104.05", driver_cuda="12.2")
    assert report.row("driver").status == "warn" and "570.26" in report.row("driver").fix
    report, _ = run(make_spec, workspace, facts, torch_cuda="13.0", driver_version="550.54.14", driver_cuda="12.4")
    row = report.row("driver")
    assert row.status == "fail" and "580.65.06" in row.fix
    with pytest.raises(EnvironmentProblem) as exc:
        report.raise_if_failed()
    assert exc.value.exit_code == EXIT_ENVIRONMENT == 3
    assert "driver" in str(exc.value) and "580.65.06" in str(exc.value)


def test_sm75_with_bf16_fails(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, name="Tesla T4", capability=(7, 5), total_gib=15, free_gib=14.5)
    rows = [r for r in report.rows if r.check == "precision"]
    assert rows and rows[0].status == "fail" and "sm80" in rows[0].detail and "sm75" in rows[0].detail


def test_sm86_with_fp8_fails_and_fp8_needs_torchao(make_spec, workspace, facts):
    spec_kw = {"model": {"type": "lora", "base_model_precision": "fp8"}}
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="NVIDIA A10", capability=(8, 6), total_gib=22, free_gib=21,
                    libs={"torchao": "0.13.0"})
    rows = [r for r in report.rows if r.check == "precision"]
    assert [r.status for r in rows] == ["fail"] and "sm89" in rows[0].detail
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="NVIDIA L4", capability=(8, 9), total_gib=22, free_gib=21)
    rows = [r for r in report.rows if r.check == "precision"]
    assert [r.status for r in rows] == ["fail"] and "torchao" in rows[0].detail and "pip install torchao" in rows[0].fix
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="NVIDIA L4", capability=(8, 9), total_gib=22, free_gib=21,
                    libs={"torchao": "0.13.0"})
    assert report.row("precision").status == "ok"


@pytest.mark.parametrize("model_type", ["full", "lora"])
def test_sm86_with_fp8_products_fails_and_they_need_torchao(make_spec, workspace, facts, model_type):
    spec_kw = {"model": {"type": model_type, "base_model_precision": "bf16"}, "train": {"mixed_precision": "fp8"}}
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="NVIDIA A10", capability=(8, 6), total_gib=22, free_gib=21,
                    libs={"torchao": "0.13.0"})
    rows = [r for r in report.rows if r.check == "precision"]
    assert [r.status for r in rows] == ["fail"] and "sm89" in rows[0].detail and "A10 is sm86" in rows[0].detail
    assert "mixed_precision fp8" in rows[0].detail and "train.mixed_precision: bf16" in rows[0].fix
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="NVIDIA L4", capability=(8, 9), total_gib=22, free_gib=21)
    rows = [r for r in report.rows if r.check == "precision"]
    assert [r.status for r in rows] == ["fail"] and "torchao" in rows[0].detail and "mixed_precision fp8" in rows[0].detail
    assert "pip install torchao" in rows[0].fix and "train.mixed_precision: bf16" in rows[0].fix
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="NVIDIA L4", capability=(8, 9), total_gib=22, free_gib=21,
                    libs={"torchao": "0.13.0"})
    assert report.row("precision").status == "ok" and "mixed precision fp8" in report.row("precision").detail
    assert "float8 tensor cores" not in report.row("precision").detail  # already on


def test_an_sm89_gpu_with_torchao_gets_the_fp8_hint(make_spec, workspace, facts):
    def detail(spec_kw, capability, libs):
        report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="GPU", capability=capability, total_gib=80,
                        free_gib=79, libs=libs)
        assert report.row("precision").status == "ok"
        return report.row("precision").detail

    assert "train.mixed_precision: fp8" in detail({}, (9, 0), {"torchao": "0.13.0"})
    assert "float8" not in detail({}, (8, 0), {"torchao": "0.13.0"})  # an A100 has no float8 tensor cores
    assert "float8" not in detail({}, (9, 0), {})  # nothing to run it with
    assert "float8" not in detail({"speed": {"compile_blocks": False}}, (9, 0), {"torchao": "0.13.0"})  # no gain eagerly


def test_fp8_products_on_a_t4_fail_for_bf16_and_for_fp8(make_spec, workspace, facts):
    # fp8 products autocast in bf16 too, so an sm75 GPU fails both ways
    report, _ = run(make_spec, workspace, facts, spec_kw={"train": {"mixed_precision": "fp8"}}, name="Tesla T4", capability=(7, 5),
                    total_gib=15, free_gib=14.5, libs={"torchao": "0.13.0"})
    details = [r.detail for r in report.rows if r.check == "precision" and r.status == "fail"]
    assert len(details) == 2 and "sm80" in details[0] and "sm89" in details[1], details


def test_optimizer_library_missing(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, spec_kw={"train": {"optimizer": "adamw_8bit"}})
    row = report.row("precision")
    assert row.status == "fail" and "bitsandbytes" in row.detail


def test_no_gpu_fails_for_a_normal_spec(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, gpu=False)
    assert report.row("gpu").status == "fail"
    assert report.row("vram").status == "warn" and "GiB" in report.row("vram").detail
    with pytest.raises(EnvironmentProblem):
        report.raise_if_failed()


def test_no_gpu_is_fine_for_a_tiny_local_model(make_spec, workspace, facts, tiny_model_dir):
    report, _ = run(make_spec, workspace, facts, gpu=False,
                    spec_kw={"model": {"pretrained_model_name_or_path": "models/tiny", "base_model_precision": "fp32"},
                             "train": {"mixed_precision": "no", "optimizer": "adamw"}, "validation": {"enabled": False}})
    assert report.row("gpu").status == "ok" and report.row("vram").status == "ok"
    assert report.facts["transformer_params"] < 1_000_000
    report.raise_if_failed()


def test_gpu_present_but_torch_cannot_use_it(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, cuda_available=False,
                    torch_cuda_error="The NVIDIA driver on your system is too old (found version 11040)")
    row = report.row("torch")
    assert row.status == "fail" and "too old" in row.detail


def test_low_disk_fails(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, disk_gib=5)
    row = report.row("disk (workspace)")
    assert row.status == "fail"
    assert row.data["parts"]["checkpoints"] > 0 and row.data["parts"]["model_download"] > 0
    assert "total_limit" in row.fix


def test_disk_counts_caches_for_local_clips(make_spec, workspace, facts, tmp_path):
    spec = make_spec()
    ws = workspace(spec)
    clips = ws.root / "clips"
    clips.mkdir(parents=True)
    for i in range(10):
        (clips / f"c{i}.mp4").write_bytes(b"x")
        (clips / f"c{i}.txt").write_text("a caption")
    report = run_preflight(spec, ws, facts=facts(disk_paths=[str(ws.root)]), check_remotes=False)
    parts = report.row("disk (workspace)").data["parts"]
    assert parts["latent_cache"] == 10 * 16 * 21 * 60 * 104 * 2  # 10 clips of 81x832x480 latents, bf16
    assert parts["text_embed_cache"] == 12 * 300 * (2304 * 2 + 8)  # 10 captions + the validation prompts


def test_low_ram_with_group_offload_fails_and_suggests_disk(make_spec, workspace, facts):
    spec_kw = {"model": {"type": "lora"}, "memory": {"group_offload": {"enabled": True}}}
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, ram_gib=12)
    row = report.row("host ram")
    assert row.status == "fail" and "group offload weights" in row.detail and "to_disk_path" in row.fix
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, ram_gib=64)
    assert report.row("host ram").status == "ok"


def test_offload_to_disk_checks_that_folder(make_spec, workspace, facts, tmp_path):
    offload = tmp_path / "offload"
    spec_kw = {"model": {"type": "lora"}, "memory": {"group_offload": {"enabled": True, "to_disk_path": str(offload)}}}
    spec = make_spec(**spec_kw)
    ws = workspace(spec)
    f = facts(ram_gib=12, disk_paths=[str(ws.root)])
    f.disk_free[str(offload)] = 1 * GIB
    report = run_preflight(spec, ws, facts=f, check_remotes=False)
    assert report.row("host ram").status == "ok"  # the weights go to disk instead
    row = report.row("disk (offload folder)")
    assert row.status == "fail" and row.data["parts"]["offloaded_weights"] == pytest.approx(1_905_841_344 * 2)


def test_not_fitting_vram_fails_with_suggestions_each_smaller(make_spec, workspace, facts):
    spec_kw = {"memory": {"gradient_checkpointing": False}, "train": {"optimizer": "adamw"}}
    report, _ = run(make_spec, workspace, facts, spec_kw=spec_kw, name="NVIDIA A100-SXM4-40GB", capability=(8, 0),
                    total_gib=39.4, free_gib=39.0)
    row = report.row("vram")
    assert row.status == "fail"
    estimate = row.data["estimate"]["total_gib"]
    suggestions = row.data["suggestions"]
    assert suggestions and all(s["estimate_gib"] < estimate for s in suggestions)
    assert suggestions[0]["fits"] and suggestions[0]["estimate_gib"] <= 39.0
    assert "memory.gradient_checkpointing: true" in row.fix and "GiB" in row.fix
    with pytest.raises(EnvironmentProblem) as exc:
        report.raise_if_failed()
    assert "gradient_checkpointing" in exc.value.fix


def test_tight_vram_warns(make_spec, workspace, facts):
    report, _ = run(make_spec, workspace, facts, name="NVIDIA RTX 4090", capability=(8, 9), total_gib=24, free_gib=23.5,
                    spec_kw={"train": {"optimizer": "adamw_bf16"}, "validation": {"enabled": False}})
    assert report.row("vram").status in ("warn", "fail")
    est = report.row("vram").data["estimate"]["total_gib"]
    assert (report.row("vram").status == "warn") == (est <= 23.5)


def test_multi_gpu_uses_the_smallest_free(make_spec, workspace, facts):
    from job.preflight import GpuFacts

    spec = make_spec(train={"num_processes": 2})
    ws = workspace(spec)
    f = facts(disk_paths=[str(ws.root)])
    f.gpus.append(GpuFacts(1, "NVIDIA H100 80GB HBM3", (9, 0), int(79.6 * GIB), int(10 * GIB)))
    report = run_preflight(spec, ws, facts=f, check_remotes=False)
    assert report.row("vram").status == "fail" and report.row("vram").data["free_vram"] == 10 * GIB


def test_preflight_phase_prints_json_and_raises(make_spec, workspace, facts, capsys, monkeypatch):
    import job.preflight as preflight

    spec = make_spec()
    ws = workspace(spec)

    class Loaded:
        pass

    loaded = Loaded()
    loaded.spec = spec
    monkeypatch.setattr(preflight, "gather_facts", lambda **kw: facts(gpu=False, disk_paths=[str(ws.root)]))
    with pytest.raises(EnvironmentProblem) as exc:
        preflight.preflight_phase(loaded, ws, json_output=True, check_remotes=False)
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "fail" and "gpu" in str(exc.value)
    assert json.loads((ws.state_dir / "preflight.json").read_text()) == data


def test_spare_vram_gets_a_faster_setting_that_still_fits(make_spec, workspace, facts):
    """80 GB and a LoRA at the defaults (every block recomputed): preflight names the fastest kept-blocks setting
    whose estimate still fits; with a setting of its own, or no room, it names none."""
    report, _ = run(make_spec, workspace, facts, spec_kw={"model": {"type": "lora"}}, name="NVIDIA H100 80GB HBM3",
                    capability=(9, 0), total_gib=79.6, free_gib=79.0)
    row = report.row("vram")
    assert row.status == "ok"
    hint = row.data["speed_hint"]
    assert hint["change"] == "speed.keep_activations_blocks: 20 with speed.activation_memory_budget: 0.5"
    assert hint["fits"] and row.data["estimate"]["total_gib"] < hint["estimate_gib"] <= 0.9 * 79.0
    assert "memory to spare" in row.fix
    # a 48 GB card: the first setting that fits is a smaller budget
    report, _ = run(make_spec, workspace, facts, spec_kw={"model": {"type": "lora"}}, name="NVIDIA L40S",
                    capability=(8, 9), total_gib=44.5, free_gib=44.0)
    assert report.row("vram").data["speed_hint"]["change"].endswith("budget: 0.3")
    report, _ = run(make_spec, workspace, facts, spec_kw={"model": {"type": "lora"}, "speed": {"keep_activations_blocks": 4}},
                    name="NVIDIA H100 80GB HBM3", capability=(9, 0), total_gib=79.6, free_gib=79.0)
    assert "speed_hint" not in report.row("vram").data and report.row("vram").fix is None
