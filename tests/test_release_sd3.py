"""The embedded SD3 model's card: the history of its runs is read from their checkpoints."""

from __future__ import annotations

import torch

from attnseg.train.embedded.release_sd3 import history_table, run_history


def _ckpt(folder, step, colour_prob, decay=(None, 0), noise=None, teacher=None, **arch):
    folder.mkdir()
    config = {"colour_prob": colour_prob, "lr_decay_steps": decay[1], "sd3_arch": {"layers": 4, **arch}}
    if noise is not None:  # checkpoints written before the setting existed lack it
        config["noise_mean"], config["noise_std"] = noise
    if teacher is not None:
        config["teacher"] = teacher
    torch.save({"step": step, "decay_from": decay[0], "config": config}, folder / "sd3-ckpt.pt")
    return str(folder)


def test_run_history_names_each_runs_change_and_counts_steps_across_runs(tmp_path):
    works = [
        _ckpt(tmp_path / "t1", 100, 0.8),  # written before pooled / mix_text existed: both on
        _ckpt(tmp_path / "t2", 40, 0.5, pooled=False, mix_text=True),
        _ckpt(tmp_path / "t3", 10, 0.5, pooled=False, mix_text=False, pos_scale=0.25, layers=8),
        _ckpt(tmp_path / "t4", 5, 0.5, pooled=False, mix_text=False, pos_scale=0.25, layers=8),
    ]
    runs, rows = run_history(works)
    table = history_table(rows)
    assert [r["steps"] for r in runs] == [100, 40, 10, 5]
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| T1 | 0-100 | from scratch") and rows[0].endswith(" | 80% |")
    assert rows[1] == "| T2 | 100-140 | pooled conditioning off | 50% |"
    assert rows[2].startswith("| T3 | 140-150 | grown from 4 to 8 joint blocks")
    assert "text stream frozen" in rows[2] and "position table x 0.25 (was x 1.0)" in rows[2]
    assert rows[3] == "| T4 | 150-155 | continued | 50% |"


def test_run_history_names_a_change_of_the_noise_levels_and_of_the_teacher(tmp_path):
    import json

    works = [
        _ckpt(tmp_path / "t3", 40, 0.3, noise=(0.5, 1.25)),
        _ckpt(tmp_path / "t4", 5, 0.3, noise=(0.5, 1.25)),
        _ckpt(tmp_path / "t5", 5, 0.3, teacher="/somewhere/assets/embedded"),
        _ckpt(tmp_path / "t6", 5, 0.3, teacher=""),
    ]
    released = {"runs": [{"run": "T2", "from": 0, "to": 160, "change": "x", "colour": 30}], "hours": 1, "arch": {"layers": 4}}
    start = {"stage": "sd3", "init_ckpt": "released", "from_step": 160, "released_history": released}
    (tmp_path / "t3" / "log.jsonl").write_text(json.dumps(start) + "\n")
    _, rows = run_history(works)
    assert (
        rows[1]["change"] == "from the released weights of T2 (its EMA); noise levels lognorm(0.5, 1.25) (was lognorm(0.0, 1.0))"
    )
    assert rows[1]["noise"] == [0.5, 1.25] and rows[2]["change"] == "continued"
    assert rows[3]["change"] == (
        "noise levels lognorm(0.0, 1.0) (was lognorm(0.5, 1.25)) and targets from the UNet teacher 'embedded'"
    )
    assert rows[3]["teacher"] == "embedded" and rows[4]["change"] == "its own targets (was the teacher 'embedded')"


def test_the_history_ends_at_the_exported_step():
    from attnseg.train.embedded.release_sd3 import _until

    log = [{"stage": "sd3", "init_ckpt": "x"}, {"step": 50, "loss": 0.5}, {"step": 100, "loss": 0.4}, {"step": 150, "loss": 0.3}]
    assert _until(log, 100) == log[:3]
    assert _until(log, 1000) == log


def test_run_history_takes_the_exported_step_for_the_last_run(tmp_path):
    works = [_ckpt(tmp_path / "t1", 100, 0.5), _ckpt(tmp_path / "t2", 40, 0.5, decay=(10, 600), layers=8)]
    runs, rows = run_history(works, last_step=30)
    table = history_table(rows)
    assert runs[-1]["steps"] == 30 and "| T2 | 100-130 |" in table
    # the finishing phase, in the lineage's steps, cut where the exported weights end
    assert "learning rate cosine-decayed to 10% over steps 110-130 | 50% |" in table


def test_a_run_counts_up_to_the_step_the_next_one_started_from(tmp_path):
    import json

    works = [_ckpt(tmp_path / "t1", 100, 0.5), _ckpt(tmp_path / "t2", 40, 0.5, layers=8), _ckpt(tmp_path / "t3", 5, 0.5)]
    # t2 started from t1's step 60 and t3 from t2's step 25: both sources went on beside their branches
    (tmp_path / "t2" / "log.jsonl").write_text(json.dumps({"stage": "sd3", "init_ckpt": "x", "from_step": 60}) + "\n")
    (tmp_path / "t3" / "log.jsonl").write_text(json.dumps({"stage": "sd3", "from_step": 25}) + "\n")
    runs, rows = run_history(works)
    table = history_table(rows)
    assert [r["steps"] for r in runs] == [60, 25, 5]
    assert "| T2 | 60-85 |" in table and "| T3 | 85-90 |" in table


def test_a_run_from_a_released_model_carries_the_release_history_on(tmp_path):
    import json

    released = {
        "runs": [
            {"run": "T1", "from": 0, "to": 100, "change": "from scratch", "colour": 50},
            {"run": "T2", "from": 100, "to": 160, "change": "pooled conditioning off", "colour": 50},
        ],
        "hours": 2.5,
        "arch": {"layers": 4, "pooled": False, "mix_text": True},
    }
    works = [
        _ckpt(tmp_path / "t3", 40, 0.3, pooled=False, mix_text=True, patch=2),
        _ckpt(tmp_path / "t4", 5, 0.3, pooled=False, mix_text=True, patch=2),
    ]
    # the run's log holds the history it started from (stage_sd3 copies it from the folder's training.json)
    start = {"stage": "sd3", "init_ckpt": "released", "from_step": 160, "released_history": released}
    (tmp_path / "t3" / "log.jsonl").write_text(json.dumps(start) + "\n")
    _, rows = run_history(works)
    assert [r["run"] for r in rows] == ["T1", "T2", "T3", "T4"] and rows[:2] == released["runs"]
    assert rows[2] == {
        "run": "T3",
        "from": 160,
        "to": 200,
        "change": "from the released weights of T2 (its EMA); re-patched to tokens of 2 x 2 latent pixels (was 1 x 1)",
        "colour": 30,
        "noise": [0.0, 1.0],
        "teacher": "",
    }
    assert rows[3] == {
        "run": "T4",
        "from": 200,
        "to": 205,
        "change": "continued",
        "colour": 30,
        "noise": [0.0, 1.0],
        "teacher": "",
    }
    assert "| T3 | 160-200 | from the released weights of T2" in history_table(rows)


def test_the_card_names_the_joint_blocks_a_preset_reads():
    from attnseg.diffusion.layers import LayerInfo, LayerSelect
    from attnseg.train.embedded.release_sd3 import blocks_read

    blocks = [
        LayerInfo(f"transformer_blocks.{b}.attn:{kind}", kind, "joint", 0, 0, 4, source="joint")
        for b in range(4)
        for kind in ("cross", "self")
    ]
    assert blocks_read(LayerSelect(kind="cross"), blocks) == "every joint block"
    assert blocks_read((LayerSelect(kind="cross", take=(-1, None)),), blocks) == "the last joint block"
    assert blocks_read(LayerSelect(kind="self", take=(1, 2)), blocks) == "joint block 1"
    names = ("transformer_blocks.0.attn:cross", "transformer_blocks.2.attn:cross")
    assert blocks_read(LayerSelect(kind="cross", names=names), blocks) == "joint blocks 0 and 2"
    chosen = (
        LayerSelect(kind="cross", names=("transformer_blocks.1.attn:cross", "transformer_blocks.3.attn:cross"), heads=(1,)),
        LayerSelect(kind="cross", names=("transformer_blocks.0.attn:cross",), heads=(0, 2)),
        LayerSelect(kind="cross", names=("transformer_blocks.2.attn:cross",)),
    )
    assert blocks_read(chosen, blocks) == (
        "head 1 of joint blocks 1 and 3, heads 0 and 2 of joint block 0 and every head of joint block 2"
    )
