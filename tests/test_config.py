import argparse

import pytest

from ray_mtt.cli.common import add_config_args, config_from_args
from ray_mtt.core.config import CONFIG_DIR, Config, apply_overrides, load_yaml
from ray_mtt.core.errors import UserError


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  syn_steps: 7\n  lr_img: 5\nexperts:\n  epochs: 4\n")
    cfg = parse("--config", str(path), "--distill.syn_steps", "9", "--eval.models", "convnet,alexnet")
    assert cfg.distill.syn_steps == 9  # flag beats YAML
    assert cfg.distill.lr_img == 5.0 and isinstance(cfg.distill.lr_img, float)
    assert cfg.experts.epochs == 4
    assert cfg.eval.models == ["convnet", "alexnet"]
    assert cfg.distill.max_start_epoch == Config().distill.max_start_epoch


def test_shipped_config_is_picked_by_dataset_and_ipc():
    cfg = parse("--dataset", "cifar10", "--ipc", "10")
    assert (cfg.distill.syn_steps, cfg.distill.max_start_epoch, cfg.distill.lr_teacher) == (30, 20, 0.001)
    assert cfg.data.zca is True


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = apply_overrides(Config(), load_yaml(path), str(path)).validate()
    assert path.name == f"{cfg.data.dataset}_ipc{cfg.distill.ipc}.yaml"


@pytest.mark.parametrize("argv, message", [
    (["--distill.syn_steps", "zero"], "cannot read 'zero' as int"),
    (["--distill.syn_steps", "0"], "distill.syn_steps must be >= 1"),
    (["--distill.init", "gauss"], "distill.init must be"),
    (["--data.zca", "maybe"], "as bool"),
])
def test_bad_values_are_named(argv, message):
    with pytest.raises(UserError, match=message):
        parse(*argv)


def test_unknown_yaml_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  synsteps: 3\n")
    with pytest.raises(UserError, match="unknown key 'distill.synsteps'"):
        parse("--config", str(bad))
    bad.write_text("distil:\n  syn_steps: 3\n")
    with pytest.raises(UserError, match="unknown config section 'distil'"):
        parse("--config", str(bad))
    bad.write_text("distill: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse("--config", str(bad))


@pytest.mark.parametrize("cls_name", ["JobResources", "SweepOptions"])
def test_job_and_sweep_options_come_from_their_one_declaration(cls_name):
    """Flags, help, types, choices and defaults of the experts job and the sweep all come from the
    dataclass in scale/options.py: no flag without a field, no field without a flag."""
    import dataclasses

    from ray_mtt.cli.common import add_options, options_from_args
    from ray_mtt.core.config import field_help
    from ray_mtt.scale import options
    cls = getattr(options, cls_name)
    parser = argparse.ArgumentParser()
    add_options(parser, cls, "options")
    assert options_from_args(cls, parser.parse_args([])) == cls()  # defaults: the declaration's
    helps = field_help(cls)
    by_dest = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(by_dest) == {f.name for f in dataclasses.fields(cls)}
    for name, action in by_dest.items():
        assert helps[name] and helps[name] in action.help, name
    if cls_name == "JobResources":
        parsed = options_from_args(cls, parser.parse_args(["--workers", "4", "--use-gpu", "no", "--gpus-per-worker", "0.25"]))
        assert (parsed.workers, parsed.use_gpu, parsed.gpus_per_worker) == (4, "no", 0.25)
        with pytest.raises(SystemExit):
            parser.parse_args(["--use-gpu", "maybe"])  # choices from the Literal
    else:
        parsed = options_from_args(cls, parser.parse_args(["--no-asha", "--space", "a=1", "--space", "b=choice:1,2",
                                                           "--eval-models", "convnet,alexnet", "--make-experts"]))
        assert (parsed.asha, parsed.make_experts) == (False, True)
        assert parsed.space == ["a=1", "b=choice:1,2"] and parsed.eval_models == ["convnet", "alexnet"]
        assert cls().space == []  # appending did not touch the declaration's default
