import dataclasses
import subprocess
import sys
from typing import Literal, Optional

import pytest

from recipes.config import ConfigError, load_config, required, save_config, read_yaml


@dataclasses.dataclass
class Trainer:
    max_steps: int = 10
    lr: float = 1e-3
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclasses.dataclass
class Cfg:
    name: str = required()
    trainer: Trainer = dataclasses.field(default_factory=Trainer)
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    note: Optional[str] = None


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "name: a\ntrainer:\n  max_steps: 5\n")
    cfg = load_config(Cfg, p, ["trainer.lr=1e-4", "levels=[3,4]", "note=hi"])
    assert cfg.trainer.max_steps == 5 and cfg.trainer.lr == 1e-4 and cfg.levels == [3, 4] and cfg.note == "hi"
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Cfg, out)
    assert again == cfg


def test_unknown_key_in_yaml_names_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, "name: a\ntrainer:\n  max_stepz: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, p)
    msg = str(err.value)
    assert f"{p}:3" in msg and "trainer.max_stepz" in msg and "trainer.max_steps" in msg


def test_unknown_override_names_key(tmp_path):
    p = write(tmp_path, "name: a\n")
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz.*did you mean 'trainer\.max_steps'"):
        load_config(Cfg, p, ["trainer.max_stepz=3"])


def test_wrong_type_and_missing_required(tmp_path):
    p = write(tmp_path, "name: a\ntrainer:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=rf"{p}:3.*trainer\.max_steps.*integer"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match="missing required value 'name'"):
        load_config(Cfg, write(tmp_path, "trainer: {}\n"))
    with pytest.raises(ConfigError, match="schedule.*one of"):
        load_config(Cfg, write(tmp_path, "name: a\n"), ["trainer.schedule=linear"])


def test_read_yaml_lines(tmp_path):
    _, where = read_yaml(write(tmp_path, "a: 1\nb:\n  c: 2\n"))
    assert where["b.c"].endswith(":3")


def test_cli_lists_stages():
    out = subprocess.run([sys.executable, "-m", "recipes.cli", "--help"], capture_output=True, text=True, check=True)
    assert "task" in out.stdout


@pytest.mark.parametrize("stage,typo,key", [("sft", "training.max_stepz", "training.max_steps"),
                                             ("grpo", "grpo.stepz", "grpo.steps"),
                                             ("kd", "training.max_stepz", "training.max_steps")])
def test_bad_override_on_a_real_stage_names_the_key(stage, typo, key):
    out = subprocess.run([sys.executable, "-m", "recipes.cli", stage, f"{typo}=3"], capture_output=True, text=True)
    assert out.returncode == 2
    assert typo in out.stderr and f"did you mean '{key}'" in out.stderr


def test_grpo_takes_no_batch_or_length_keys_it_would_ignore():
    # GRPO's batch is grpo.prompts_per_step x grpo.group_size and its length grpo.steps
    for override in ("training.max_steps=3", "training.global_batch_size=8"):
        out = subprocess.run([sys.executable, "-m", "recipes.cli", "grpo", override], capture_output=True, text=True)
        assert out.returncode == 2 and "unknown key" in out.stderr, override


def test_every_stage_has_help():
    from recipes.cli import STAGES

    for stage in STAGES:
        out = subprocess.run([sys.executable, "-m", "recipes.cli", stage, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: nrr" in out.stdout, (stage, out.stderr[-500:])


def test_context_parallel_without_transformer_engine_is_a_config_error():
    from recipes.megatron.providers import have_te
    from recipes.trainer import ParallelConfig, check_parallel

    if have_te():
        pytest.skip("Transformer Engine is present: cp > 1 runs")
    with pytest.raises(ConfigError, match=r"parallel\.cp=2: context parallelism needs Transformer Engine"):
        check_parallel(ParallelConfig(tp=1, cp=2))
    out = subprocess.run([sys.executable, "-m", "recipes.cli", "sft", "parallel.cp=2"], capture_output=True, text=True)
    assert out.returncode == 2 and "parallel.cp=2" in out.stderr and "Transformer Engine" in out.stderr
