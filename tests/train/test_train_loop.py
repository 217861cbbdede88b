"""The training loop end to end on the tiny model: learning, outputs, optimizers, schedules, guards."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from job.errors import EnvironmentProblem, InputError
from job.models.sanavideo.objective import FlowMatchingObjective
from job.train import TrainHooks, run_train
from job.train.step import TrainingDiverged, caption_dropout
from train_helpers import deterministic_inputs, make_job, trained_state


def metrics(ws) -> list[dict]:
    return [json.loads(line) for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]


def test_overfitting_one_clip_lowers_the_loss(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, n_samples=1,
                        train={"max_train_steps": 200, "learning_rate": 2e-3, "optimizer": "adamw",
                               "timesteps": {"weighting_scheme": "uniform", "flow_shift": 1.0}})
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 200
    losses = [m["loss"] for m in metrics(ws)]
    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    assert last < 0.7 * first, (first, last)


def test_outputs_metrics_and_already_complete(tmp_path, tiny_model):
    from diffusers import SanaVideoTransformer3DModel

    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 4})
    hooks = TrainHooks()
    seen = []
    hooks.on_step_end.append(lambda info: seen.append((info.step, info.is_main_process, round(info.metrics["loss"], 6))))
    result = run_train(spec, ws, hooks)
    assert result.status == "completed" and result.final_dir == ws.final_dir
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    model = SanaVideoTransformer3DModel.from_pretrained(ws.final_dir / "transformer")
    final = dict(model.state_dict())
    ckpt = trained_state(ws)
    assert set(final) == set(ckpt) and all(torch.equal(final[k], ckpt[k]) for k in final)
    base = SanaVideoTransformer3DModel.from_pretrained(tiny_model / "transformer").state_dict()
    assert any(not torch.equal(base[k], final[k]) for k in final)
    summary = json.loads((ws.final_dir / "training_summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 4 and summary["weights"] == "transformer/"
    assert "pretrained_model_name_or_path" in (ws.final_dir / "spec.yaml").read_text()
    rows = metrics(ws)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "step_time", "samples_per_s", "tokens_per_s", "peak_mem_gb"} <= set(rows[0])
    assert rows[0]["tokens_per_s"] > rows[0]["samples_per_s"] > 0
    assert [round(r["loss"], 6) for r in rows] == [l for _, _, l in seen]
    again = run_train(spec, ws)
    assert again.status == "already_complete" and again.step == 4


@pytest.mark.parametrize("optimizer,precision", [("adamw", "fp32"), ("adamw_bf16", "bf16"), ("adamw_bf16", "fp32"),
                                                 ("optimi-adamw", "bf16")])
def test_optimizers_train(tmp_path, tiny_model, optimizer, precision):
    pytest.importorskip("optimi") if optimizer == "optimi-adamw" else None
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 3, "optimizer": optimizer},
                        model={"pretrained_model_name_or_path": str(tiny_model), "base_model_precision": precision,
                               "prompt": {"max_sequence_length": 8}})
    assert run_train(spec, ws).status == "completed"
    state = trained_state(ws)
    assert next(iter(state.values())).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert all(math.isfinite(r["loss"]) for r in metrics(ws))


def test_adamw_8bit_without_bitsandbytes_is_an_environment_problem(tmp_path, tiny_model):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is importable here")
    except Exception:
        pass
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 2, "optimizer": "adamw_8bit"})
    with pytest.raises(EnvironmentProblem, match="bitsandbytes"):
        run_train(spec, ws)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "cosine", "linear", "polynomial"])
def test_schedulers(tmp_path, tiny_model, name):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 5, "lr_scheduler": name, "lr_warmup_steps": 2,
                                                      "learning_rate": 1e-3})
    assert run_train(spec, ws).status == "completed"
    lrs = [r["lr"] for r in metrics(ws)]
    if name == "constant":
        assert lrs == [1e-3] * 5
    else:  # lr logged after the scheduler step of that step: warmup 2 -> 5e-4, then the peak
        assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
        if name in ("cosine", "linear", "polynomial"):
            assert lrs[4] < lrs[2] < lrs[1]


def test_grad_accumulation_equivalence(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(FlowMatchingObjective, "training_inputs", deterministic_inputs)
    results = []
    for name, bs, accum in (("a", 2, 1), ("b", 1, 2)):
        spec, ws = make_job(tmp_path / name, tiny_model, n_samples=2,
                            train={"max_train_steps": 3, "train_batch_size": bs, "gradient_accumulation_steps": accum,
                                   "max_grad_norm": 0.5, "adam_epsilon": 1e-6})
        assert run_train(spec, ws).status == "completed"
        results.append(trained_state(ws))
    a, b = results
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_nan_steps_are_skipped_counted_and_abort(tmp_path, tiny_model, monkeypatch):
    calls = {"n": 0}
    original = FlowMatchingObjective.loss

    def sometimes_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(FlowMatchingObjective, "loss", sometimes_nan)
    spec, ws = make_job(tmp_path / "a", tiny_model, train={"max_train_steps": 4, "max_bad_steps": 3})
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 4 and calls["n"] == 6
    summary = json.loads((ws.final_dir / "training_summary.json").read_text())
    assert summary["bad_steps_skipped"] == 2
    assert all(math.isfinite(r["loss"]) for r in metrics(ws))

    monkeypatch.setattr(FlowMatchingObjective, "loss", lambda self, *a, **k: original(self, *a, **k) * float("inf"))
    spec, ws = make_job(tmp_path / "b", tiny_model, train={"max_train_steps": 10, "max_bad_steps": 3})
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row") as info:
        run_train(spec, ws)
    assert "learning_rate" in str(info.value)


def test_caption_dropout_uses_the_empty_prompt():
    empty = (torch.full((8, 32), 7.0), torch.zeros(8, dtype=torch.int64))
    batch = {"prompt_embeds": torch.zeros(4, 8, 32), "prompt_attention_mask": torch.ones(4, 8, dtype=torch.int64)}

    def session(p):
        return SimpleNamespace(generator=torch.Generator().manual_seed(0), world=1, rank=0, empty_prompt=empty,
                               weight_dtype=torch.float32, spec=SimpleNamespace(train=SimpleNamespace(caption_dropout_probability=p),
                                                                               speed=SimpleNamespace(trim_text_padding=True)))

    e, m = caption_dropout(session(1.0), batch, torch.device("cpu"))
    assert torch.equal(e, empty[0].expand(4, 8, 32)) and m.sum() == 0
    e, m = caption_dropout(session(0.0), batch, torch.device("cpu"))
    assert torch.equal(e, batch["prompt_embeds"]) and torch.equal(m, batch["prompt_attention_mask"])
    e, _ = caption_dropout(session(0.5), {k: v.repeat(16, *[1] * (v.ndim - 1)) for k, v in batch.items()}, torch.device("cpu"))
    dropped = (e[:, 0, 0] == 7.0).sum().item()
    assert 10 < dropped < 54


def test_caption_dropout_needs_the_cached_empty_prompt(tmp_path, tiny_model):
    from job.cache import format as fmt

    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 2, "caption_dropout_probability": 0.5})
    fmt.text_path(ws.text_cache_dir, fmt.text_key_context(spec, ws).empty_key()).unlink()
    with pytest.raises(InputError, match="empty-prompt"):
        run_train(spec, ws)


def test_ema_masked_loss_checkpointing_and_bf16_autocast(tmp_path, tiny_model):
    spec, ws = make_job(
        tmp_path, tiny_model, with_mask=True,
        data={"datasets": [{"id": "clips", "source": "clips", "masks_dir": "masks"}], "text_embeds": {"cache_dir": "cache/text"}},
        train={"max_train_steps": 4, "use_ema": True, "ema": {"decay": 0.5, "update_interval": 2}, "masked_loss": True,
               "mixed_precision": "bf16", "caption_dropout_probability": 0.5},
        memory={"gradient_checkpointing": True},
    )
    assert run_train(spec, ws).status == "completed"
    from diffusers import SanaVideoTransformer3DModel

    ema = SanaVideoTransformer3DModel.from_pretrained(ws.final_dir / "transformer").state_dict()
    raw = SanaVideoTransformer3DModel.from_pretrained(ws.final_dir / "no_ema" / "transformer").state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert (ws.checkpoints_dir / "step_000004" / "ema.pt").is_file()
    state = torch.load(ws.checkpoints_dir / "step_000004" / "ema.pt", weights_only=True)
    assert state["optimization_step"] == 2  # updated every 2 steps


def test_epochs_define_the_length(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path / "a", tiny_model, n_samples=3, train={"max_train_steps": None, "num_train_epochs": 2})
    assert run_train(spec, ws).step == 6
    spec, ws = make_job(tmp_path / "b", tiny_model, n_samples=3, train={"max_train_steps": 4, "num_train_epochs": 2})
    assert run_train(spec, ws).step == 4
    spec, ws = make_job(tmp_path / "c", tiny_model, n_samples=3,
                        train={"max_train_steps": 8, "num_train_epochs": 2, "ignore_final_epochs": True})
    assert run_train(spec, ws).step == 8
    spec, ws = make_job(tmp_path / "d", tiny_model, n_samples=3, train={"max_train_steps": 8, "num_train_epochs": 2})
    assert run_train(spec, ws).step == 6


def test_unavailable_tracker_and_failing_tracker_do_not_stop_training(tmp_path, tiny_model, caplog):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 2}, tracking={"report_to": "wandb"})
    assert run_train(spec, ws).status == "completed"
    from job.train.metrics import MetricsLog

    class BrokenTracker:
        is_main_process = True

        def log(self, *a, **k):
            raise ConnectionError("service down")

    m = MetricsLog(ws, spec, BrokenTracker(), total_steps=2, start_step=0, tracker_names=[])
    m.trackers = ["wandb"]
    values = dict(loss=1.0, lr=1e-3, grad_norm=1.0, step_time=0.1, samples_per_s=1.0, tokens_per_s=1.0, peak_mem_gb=0.1)
    m.log(1, values)
    m.log(2, values)
    assert m.trackers == [] and "turned off" in caplog.text


def test_crepa_without_cached_features_is_refused_clearly(tmp_path, tiny_model):
    # CREPA trains from features the cache phase stores (tests/train/test_crepa.py); these caches have none
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 2, "crepa": {"enabled": True, "block_index": 0}})
    with pytest.raises(InputError, match="no CREPA features"):
        run_train(spec, ws)
    # fp8 / int8 bases train now: tests/train/test_quantize.py


def test_no_cached_samples_is_a_clear_error(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, n_samples=1, train={"max_train_steps": 2, "train_batch_size": 2})
    with pytest.raises(InputError, match="no samples detected"):
        run_train(spec, ws)
