"""Named recipes (SFT, KD, GRPO for Qwen2.5-1.5B/7B/32B and Llama-3.1-8B): complete configs that start from the
model's HF checkpoint, at a layout the planner chose that fits an 80 GiB H100 on the node counts they are named
for, the YAML files equal to their functions, and clear errors for layouts that cannot work."""

import pytest

from recipes import planner
from recipes.config import ConfigError, load_config
from recipes.megatron.providers import load_hf_config
from recipes.named_recipes import RECIPES, STAGE_OF, STUDENTS, sft_recipe, yaml_path
from recipes.trainer import SFTConfig, resolve_batch, resolve_path, world_size


@pytest.mark.parametrize("name, total", [("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512),
                                         ("llama3.1-8b", 8_030_261_248), ("qwen2.5-32b", 32_763_876_352),
                                         ("qwen2.5-72b", 72_706_203_648), ("llama3.1-70b", 70_553_706_496)])
def test_architectures_have_the_published_parameter_counts(name, total):
    hf = load_hf_config(resolve_path(f"recipes/assets/models/{name}/config.json"))
    assert sum(n for _, n in planner.rank_parameters(hf)) == total


@pytest.mark.parametrize("name", sorted(n for n in RECIPES if not n.endswith("-lora")))
def test_every_named_recipe_fits_at_its_nodes_and_at_twice_as_many(name):
    model = name.rsplit("-", 1)[0]
    for nodes in (STUDENTS[model], 2 * STUDENTS[model]):
        cfg = RECIPES[name](nodes=nodes)
        p = cfg.parallel
        assert world_size(cfg) == 8 * nodes and p.nodes == nodes and p.tp <= 8
        assert cfg.model.init_checkpoint.startswith("checkpoints/")  # from the HF checkpoint, not random weights
        pl = planner.check_fits(cfg)
        assert pl.total_gib <= 80 * planner.USABLE_FRACTION
        assert pl.layout.tp == p.tp and pl.layout.dp == p.dp and pl.layout.recompute == p.recompute
    if name.endswith("-sft") or name.endswith("-kd"):
        assert cfg.data.seq_length >= 16384
        rows, grad_acc = resolve_batch(cfg)
        assert rows % (cfg.training.micro_batch_size * p.dp) == 0 and grad_acc >= 1


def test_the_32b_student_needs_four_nodes():
    with pytest.raises(ValueError, match="no layout of 1 node"):
        RECIPES["qwen2.5-32b-sft"](nodes=1)
    assert STUDENTS["qwen2.5-32b"] >= 4


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_named_yaml_files_load_and_match_their_functions(name):
    from recipes.grpo import GRPOConfig
    from recipes.kd import KDConfig

    cls = {"sft": SFTConfig, "kd": KDConfig, "grpo": GRPOConfig}[STAGE_OF[name.rsplit("-", 1)[1]]]
    path = resolve_path(str(yaml_path(name)))
    assert load_config(cls, path) == RECIPES[name]()
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("| TP" in line and "| yes |" in line for line in header)  # the plan it was checked against


def test_layouts_that_cannot_work_are_clear_errors():
    with pytest.raises(ValueError, match="needs .* GiB per GPU"):  # no sharding of a 7B model's Adam state
        sft_recipe("qwen2.5-7b", nodes=1, layout=planner.Layout(tp=1, dp=8))
    with pytest.raises(ValueError, match="has 8 ranks but 2 node"):
        sft_recipe("qwen2.5-7b", nodes=2, layout=planner.Layout(tp=4, dp=2, distributed_optimizer=True))
    with pytest.raises(ValueError, match="num_key_value_heads=4"):
        sft_recipe("qwen2.5-7b", nodes=1, layout=planner.Layout(tp=8, dp=1))
    with pytest.raises(ValueError, match="would span nodes"):
        sft_recipe("qwen2.5-32b", nodes=2, gpus_per_node=4, layout=planner.Layout(tp=8, dp=1))


def test_batch_settings_are_checked():
    cfg = load_config(SFTConfig, None, ["training.global_batch_size=null", "training.global_batch_tokens=4096",
                                         "data.seq_length=128", "training.micro_batch_size=8"])
    assert resolve_batch(cfg) == (32, 4)
    cfg = load_config(SFTConfig, None, ["training.global_batch_size=null", "training.grad_accumulation=3",
                                         "parallel.dp=2", "training.micro_batch_size=4"])
    assert resolve_batch(cfg) == (24, 3)
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size"):
        resolve_batch(load_config(SFTConfig, None, ["training.global_batch_size=30", "training.micro_batch_size=8"]))
    with pytest.raises(ConfigError, match="exactly one of"):
        resolve_batch(load_config(SFTConfig, None, ["training.global_batch_tokens=4096"]))


@pytest.mark.parametrize("name", ["qwen2.5-7b-lora", "llama3.1-8b-lora"])
def test_lora_recipes_train_a_7_8b_student_on_one_h100(name):
    cfg = RECIPES[name]()
    assert world_size(cfg) == 1 and cfg.peft.lora.enabled and cfg.data.seq_length >= 16384
    pl = planner.check_fits(cfg)  # the plan of a frozen base: gradients and Adam state for the adapters only
    assert pl.total_gib <= 80 * planner.USABLE_FRACTION
    full = planner.plan(load_hf_config(resolve_path(cfg.model.hf_config)), pl.layout, cfg.data.seq_length)
    assert pl.parts["optimizer"] < full.parts["optimizer"] / 50 and pl.parts["grads"] < full.parts["grads"] / 50
    assert not full.fits()  # full fine-tuning of the same model does not fit one H100
