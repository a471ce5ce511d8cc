"""One configuration schema: every key of ``saef train`` is declared once, and its flag, help line,
validation, resume rule and place in a checkpoint's identity all come from that declaration."""

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import saef
from saef.app import checkpoint, schema
from saef.app.cli import _parser, main
from saef.app.config import ConfigError, TrainConfig, load_config, resume_config
from saef.app.schema import FREE, REFUSED, RESETS_ERRORS

FIELDS = dataclasses.fields(TrainConfig)
TINY = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--epochs", "1", "--quiet"]


def _train_parser() -> argparse.ArgumentParser:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


def test_every_key_has_a_flag_a_help_line_and_a_resume_rule():
    """Walking the schema: each key of TrainConfig is declared with key(), has a --flag (dashes for
    underscores) writing to it, whose help holds the declared help line, and a resume rule."""
    actions = {flag: action for action in _train_parser()._actions for flag in action.option_strings}
    for field in FIELDS:
        declared = schema.spec(field)  # (a field not made by key() raises here)
        flag = "--" + field.name.replace("_", "-")
        assert flag in actions, f"no flag for {field.name}"
        assert actions[flag].dest == field.name
        assert declared.help.strip() and schema.help_text(declared) in actions[flag].help, field.name
        assert declared.on_resume in (FREE, RESETS_ERRORS, REFUSED), field.name


def test_the_resume_rules_are_the_ones_decided():
    """The keys each resume rule holds, written out (the schema tests above check the mechanism against
    the declarations; this pins the declarations): another run altogether, or meaningless saved errors."""
    assert set(schema.keys_with(TrainConfig, REFUSED)) == {
        "dataset", "dataset_size", "data_file", "test_file", "holdout", "full_batch", "model", "batch_size", "seed",
        "backend", "context", "gpt_layers", "gpt_width", "gpt_heads", "precision"}
    assert set(schema.keys_with(TrainConfig, RESETS_ERRORS)) == {
        "workers", "method", "optimizer", "compressor", "server_compressor", "double_way", "warmup_steps", "server",
        "local_steps", "inner_optimizer"}


def test_no_flags_and_no_file_is_the_default_config():
    """Parsing no flags gives None for every key (so a TOML file's value stands), and the config they make
    is the declared defaults."""
    overrides = schema.flag_values(_train_parser().parse_args([]), TrainConfig)
    assert set(overrides) == {f.name for f in FIELDS} and all(v is None for v in overrides.values())
    assert load_config(None, overrides) == TrainConfig()


def test_a_declaration_without_help_or_resume_rule_is_refused():
    """key() refuses a key with no help line or an unknown resume rule, and a plain dataclass field is
    not part of the schema."""
    with pytest.raises(ValueError, match="help"):
        schema.key(1, help=" ", on_resume=FREE)
    with pytest.raises(ValueError, match="on_resume"):
        schema.key(1, help="a number", on_resume="maybe")

    @dataclasses.dataclass
    class Plain:
        n: int = 0

    with pytest.raises(TypeError, match="not declared"):
        schema.spec(dataclasses.fields(Plain)[0])


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_a_wrong_type_names_the_key(field):
    """A value of the wrong type for any key (as a TOML file can give) is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=rf"^{field.name} must be"):
        TrainConfig(**{field.name: {"not": "a value"}})


@pytest.mark.parametrize("field", [f for f in FIELDS if schema.spec(f).range is not None], ids=lambda f: f.name)
def test_a_value_out_of_its_declared_range_names_the_key_and_the_range(field):
    """Just past either end of a key's declared range is refused, naming the key and the range."""
    declared = schema.spec(field)
    low, high = declared.range
    integer = "int" in field.type
    above = high + 1 if integer else high * 2
    for value in ([low] if declared.low_open else [low - 1]) + [above]:
        value = [int(value)] if field.type.startswith("List") else value
        with pytest.raises(ConfigError, match=rf"^{field.name} = .* is not allowed: must be .*{int(high) if integer else ''}"):
            TrainConfig(**{field.name: value})


@pytest.mark.parametrize("field", [f for f in FIELDS if schema.spec(f).choices is not None], ids=lambda f: f.name)
def test_a_value_outside_its_choices_names_the_key_and_the_choices(field):
    """A name that is not among a key's choices (read from the registries) is refused, listing them."""
    allowed = schema.spec(field).allowed()
    assert allowed and TrainConfig.__dataclass_fields__[field.name].default in allowed
    with pytest.raises(ConfigError, match=rf"^{field.name} = 'nonsense' is not allowed: choose one of {allowed[0]}"):
        TrainConfig(**{field.name: "nonsense"})


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_resume_rule_follows_the_declaration(field):
    """A change on resume of a REFUSED key is refused even with --reset-errors; of a RESETS_ERRORS key,
    refused unless --reset-errors (and the message says so); of a FREE key, taken."""
    rule = schema.spec(field).on_resume
    changed = {field.name: ("old", "new")}
    for reset in (False, True):
        if rule == REFUSED:
            with pytest.raises(ConfigError, match=f"^{field.name} cannot change on resume"):
                schema.refuse_resume_changes(TrainConfig, changed, reset)
        elif rule == RESETS_ERRORS and not reset:
            with pytest.raises(ConfigError, match=f"^{field.name} changed on resume.*--reset-errors"):
                schema.refuse_resume_changes(TrainConfig, changed, reset)
        else:
            schema.refuse_resume_changes(TrainConfig, changed, reset)


def test_checkpoint_identity_is_every_key_that_is_not_free():
    """What a checkpoint records of its run is exactly the keys whose change on resume is not free --
    precision and backend among them, as the resume rules say."""
    recorded = set(schema.identity(TrainConfig()))
    assert recorded == {f.name for f in FIELDS if schema.spec(f).on_resume != FREE}
    assert {"precision", "backend", "seed", "compressor", "workers"} <= recorded and "lr" not in recorded


def test_resume_config_refuses_precision_and_backend_changes():
    """The saved config.json of a bf16 simulator run cannot be resumed in fp32 or on the dist backend,
    with or without --reset-errors; lr may change."""
    saved = TrainConfig(precision="bf16").to_dict()
    for key, value in (("precision", "fp32"), ("backend", "dist")):
        for reset in (False, True):
            with pytest.raises(ConfigError, match=f"{key} cannot change on resume"):
                resume_config(saved, {key: value}, reset)
    config, changed = resume_config(saved, {"lr": 0.05}, False)
    assert config.precision == "bf16" and changed == {"lr": (0.1, 0.05)}


def test_lr_is_checked_by_one_function_everywhere():
    """A negative lr is refused with the same message by the run config, saef.SAEF and saef.simulate."""
    needle = "lr must be a finite number >= 0, got lr=-1"
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match=needle):
        saef.SAEF([torch.nn.Parameter(torch.zeros(3))], lr=-1, compressor="sign")
    with pytest.raises(ValueError, match=needle):
        saef.simulate(lambda k, x: x, [torch.zeros(3)], workers=2, steps=1, lr=-1, compressor="sign")


# --- end to end: a bf16 checkpoint ----------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    assert main(["train", *TINY, "--precision", "bf16", "--compressor", "sign", "--output", str(out)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bf16_checkpoint_refuses_an_fp32_resume(bf16_run, capsys):
    """Resuming a bf16 run with --precision fp32 exits 2 naming precision and both values (with or
    without --reset-errors): a run's gradients are all computed at one precision."""
    capsys.readouterr()
    for extra in ([], ["--reset-errors"]):
        assert main(["train", "--resume", str(bf16_run), "--epochs", "2", "--precision", "fp32", *extra]) == 2
        assert "precision cannot change on resume ('bf16' -> 'fp32')" in _one_line_error(capsys)


def test_checkpoint_identity_holds_the_precision(bf16_run, tmp_path, capsys):
    """A bf16 checkpoint whose config.json was edited to say fp32 is refused by the checkpoint's own record
    of its precision (exit 2, naming both values), with or without --reset-errors."""
    run = _copy(bf16_run, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "precision": "fp32"}))
    capsys.readouterr()
    for extra in ([], ["--reset-errors"]):
        assert main(["train", "--resume", str(run), "--epochs", "2", *extra]) == 2
        assert "precision = 'bf16' (this run: 'fp32')" in _one_line_error(capsys)


def test_refused_key_is_refused_and_resetting_key_needs_reset_errors(bf16_run, tmp_path, capsys):
    """seed (REFUSED) cannot change even with --reset-errors; warmup_steps (RESETS_ERRORS) changes only
    with --reset-errors, which is logged; lr (FREE) changes without it."""
    run = _copy(bf16_run, tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--seed", "1", "--reset-errors"]) == 2
    assert "seed cannot change on resume" in _one_line_error(capsys)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--warmup-steps", "3"]) == 2
    assert "warmup_steps changed on resume" in (err := _one_line_error(capsys)) and "--reset-errors" in err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--warmup-steps", "3", "--lr", "0.05", "--reset-errors", "--quiet"]) == 0
    event = json.loads((run / "events.jsonl").read_text().splitlines()[-1])
    assert event["reset_errors"] is True and event["changed"] == {"warmup_steps": [0, 3], "lr": [0.1, 0.05], "epochs": [1, 2]}


def test_checkpoint_from_before_the_schema_still_resumes(bf16_run, tmp_path):
    """A checkpoint written before precision, backend and optimizer were recorded in its identity (as older
    saef wrote them) resumes: it is checked on the keys it records."""
    run = _copy(bf16_run, tmp_path)
    folder = run / "checkpoints"
    manifest = json.loads((folder / "manifest.json").read_text())
    path = folder / next(iter(manifest[-1]["files"]))
    saved = torch.load(path, weights_only=True)
    for key in ("precision", "backend", "optimizer", "context", "gpt_layers", "gpt_width", "gpt_heads"):
        del saved["state"]["config"][key]
    torch.save(saved, path)
    manifest[-1]["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert checkpoint.load_latest(folder)["config"]["precision"] == "bf16"


def test_a_models_own_defaults_fill_only_what_is_not_given():
    """The GPT's defaults (Adam at 3e-4 after 200 full-precision steps, measured better than the global momentum
    SGD at 0.1) fill the keys a run does not give, are reported, and give way to any given key; none with
    local steps (their optimizer is inner_optimizer) or for the other models."""
    applied = {}
    config = load_config(None, {"dataset": "text", "model": "gpt"}, model_defaults=applied)
    assert (config.optimizer, config.lr, config.warmup_steps) == ("adam", 3e-4, 200) and set(applied) == {"optimizer", "lr", "warmup_steps"}
    applied = {}
    config = load_config(None, {"dataset": "text", "model": "gpt", "lr": 1e-3, "optimizer": "sgd"}, model_defaults=applied)
    assert (config.optimizer, config.lr, config.warmup_steps) == ("sgd", 1e-3, 200) and set(applied) == {"warmup_steps"}
    assert load_config(None, {"dataset": "text", "model": "gpt", "local_steps": 4}).optimizer == "sgd"
    assert load_config(None, {}).lr == 0.1
