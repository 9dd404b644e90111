"""Config loading, overrides and each kind of config error, in-process (the same errors through the real CLI:
tests/integration/test_config_cli.py)."""
import pytest
import yaml

from disent.config import ConfigError, flatten, from_dict, load_config, micro_batch_size, to_dict
from disent.tracking.naming import run_name
from disent.train.ds_config import deepspeed_config
from tests.support.train_helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.data.url


def test_extends_and_override_parsed_as_yaml():
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", ["model.z_dim=32", "optim.vae.betas=[0.9, 0.99]"])
    assert cfg.model.z_dim == 32
    assert cfg.optim.vae.betas == [0.9, 0.99]
    assert cfg.loss.swap == 1.0  # inherited from base.yaml
    assert cfg.name == "fashion_mnist"


def test_unknown_key_on_command_line_names_origin():
    with pytest.raises(ConfigError, match=r"'train.stpes' \(from the command line\); did you mean 'train.steps'"):
        load_config(ROOT / "configs/base.yaml", ["train.stpes=3"])


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(ROOT / "configs/base.yaml", ["modle.z_dim=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=1.5", "must be int"),
        ("train.progress=1", "must be bool"),
        ("model.discriminator=patch", "one of 'pair', 'label'"),
        ("optim.vae.betas=0.5", "must be a list of float"),
        ("data=3", "must be a mapping"),
        ("tracking.uri=[1]", "must be str or null"),
        ("data.num_workers=many", "must be int or one of 'auto'"),
    ],
)
def test_wrong_types(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "configs/base.yaml", [override])


def test_missing_required_name():
    with pytest.raises(ConfigError, match="missing required config key 'name'"):
        load_config(None, ["data.url=somewhere"])


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\ndata: {url: x}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_extends_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_the_same_override_given_twice_is_warned_naming_both(caplog):
    with caplog.at_level("WARNING", logger="disent.config.loading"):
        cfg = load_config(ROOT / "configs/base.yaml", ["train.steps=3", "model.z_dim=4", "train.steps=5"])
    assert cfg.train.steps == 5  # the last one, as before, but never silently
    assert "override 'train.steps' is given twice (train.steps=3, then train.steps=5): the last one is used" in caplog.text


def test_a_copied_config_whose_parent_is_not_beside_it_says_extends_is_the_cause(tmp_path):
    copied = tmp_path / "mine.yaml"
    copied.write_text((ROOT / "configs/glyphs.yaml").read_text())
    with pytest.raises(ConfigError, match=r"mine.yaml: 'extends: base.yaml' names .*base.yaml, which does not exist "
                                          r"\(extends is read relative to the file that names it\)"):
        load_config(copied)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(ROOT / "configs/base.yaml", ["model.z_dim"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.image_size=30", "28, 32 or 64"),
        ("data.num_workers=-1", ">= 0 or auto"),
        # data.streams and data.on_error are checked here only: the loader takes them as valid
        ("data.streams=0", r"'data.streams' must be auto or 1\.\.64 .*got 0"),
        ("data.streams=9 train.global_batch_size=16 train.grad_accum=2", r"'data.streams' must be auto or 1\.\.8 "
                                                                         r"\(the pairs per loader step over all ranks"),
        ("data.on_error=ignore", "'data.on_error'.*'raise', 'skip'"),
        ("train.zero_stage=3", "0, 1 or 2"),
        ("train.channels_last=true train.zero_stage=1", "needs train.zero_stage=0"),
        # fp16's optimizer keeps the weights as views of flat buffers; the conversion would detach them
        ("train.channels_last=true train.precision=fp16", "cannot be true with train.precision=fp16.*bf16"),
        ("train.global_batch_size=0", "must be > 0"),
        ("loss.real_label=1.5", "real_label"),
        ("train.checkpoint_upload_url=/tmp/x", "s3://"),
    ],
)
def test_semantic_checks(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "configs/base.yaml", override.split())


def test_a_batch_sized_per_rank_refuses_another_number_of_ranks():
    cfg = load_config(ROOT / "configs/base.yaml", ["train.global_batch_size=64", "train.batch_per_rank=16"])
    assert micro_batch_size(cfg, 4) == 16
    with pytest.raises(ConfigError, match=r"global_batch_size=64 over 8 rank\(s\) is not the train.batch_per_rank=16 "
                                          r"pairs .* set train.global_batch_size=128 for 8 rank\(s\), or launch 4 ranks"):
        micro_batch_size(cfg, 8)


def test_batch_must_divide_world_size_times_accumulation():
    cfg = load_config(ROOT / "configs/base.yaml", ["train.global_batch_size=30", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match=r"not divisible by world size \(4\) x train.grad_accum \(2\)"):
        micro_batch_size(cfg, 4)
    assert micro_batch_size(cfg, 3) == 5


def test_deepspeed_configs_derive_from_one_config():
    cfg = load_config(
        ROOT / "configs/base.yaml",
        ["train.global_batch_size=32", "train.grad_accum=2", "train.zero_stage=2", "optim.disc.lr=1e-3",
         "deepspeed.vae={zero_optimization: {reduce_bucket_size: 1000}}"],
    )
    vae, disc = deepspeed_config(cfg, "vae", 2), deepspeed_config(cfg, "disc", 2)
    assert vae["train_micro_batch_size_per_gpu"] == 8 and vae["gradient_accumulation_steps"] == 2
    assert vae["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert disc["zero_optimization"] == {"stage": 2}
    assert disc["optimizer"]["params"]["lr"] == 1e-3
    assert vae["gradient_clipping"] == cfg.train.grad_clip
    with pytest.raises(ConfigError, match="needs a GPU"):
        deepspeed_config(load_config(ROOT / "configs/base.yaml", ["train.precision=fp16"]), "vae", 1, "cpu")
    assert deepspeed_config(load_config(ROOT / "configs/base.yaml", ["train.precision=fp16"]), "vae", 1, "cuda")["fp16"]["enabled"]
    for device in ("cpu", "cuda"):
        bf16 = deepspeed_config(load_config(ROOT / "configs/base.yaml", ["train.precision=bf16"]), "disc", 1, device)
        assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not bf16["fp16"]["enabled"]


def test_round_trip_flatten_and_run_name():
    cfg = load_config(ROOT / "configs/sprites.yaml", ["model.z_dim=4", "tracking.uri=http://x"])
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    assert from_dict(to_dict(cfg), ["model.z_dim=6"]).model.z_dim == 6
    with pytest.raises(ConfigError, match="'model.zdim' \\(from the command line\\)"):
        from_dict(to_dict(cfg), ["model.zdim=6"])
    flat = flatten(to_dict(cfg))
    assert flat["model.z_dim"] == 4 and flat["optim.vae.lr"] == cfg.optim.vae.lr
    assert run_name(cfg) == "sprites model.z_dim=4"
    # Runs that differ only in their data get different names.
    a = load_config(ROOT / "configs/sprites.yaml", ["data.url=s3://bkt/sprites32"])
    b = load_config(ROOT / "configs/sprites.yaml", ["data.url=data/sprites64/"])
    assert run_name(a) == "sprites data=sprites32" and run_name(b) == "sprites data=sprites64"


def test_base_yaml_lists_every_key_of_the_schema_with_its_default():
    """configs/base.yaml is the reference users read: every key the schema knows, at the schema's default."""
    from disent.config import Config, DataConfig

    written = flatten(yaml.safe_load((ROOT / "configs" / "base.yaml").read_text()))
    defaults = flatten(to_dict(Config(name="disent", data=DataConfig(url="data/fashion_mnist"))))
    assert sorted(set(defaults) - set(written)) == [] and sorted(set(written) - set(defaults)) == []
    assert {k: (written[k], v) for k, v in defaults.items() if written[k] != v} == {}
