"""The `lit-tune` command: configs parse, `fit` runs end to end, a printed config runs again."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_tune.cli import LitTuneCLI

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class _ParseOnly(LitTuneCLI):
    """Parses and type-checks a config without building anything, so paths need not exist."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = _ParseOnly(args=["--config", str(config)], run=False)
    assert cli.config["model"]["class_path"].startswith("lit_tune.")
    assert cli.config["data"]["class_path"].startswith("lit_tune.")


OFFLINE = [c for c in CONFIGS if c.name.endswith("_tiny.yaml")]


@pytest.mark.parametrize("config", OFFLINE, ids=[c.name for c in OFFLINE])
def test_offline_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = LitTuneCLI(args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model is not None
    assert cli.datamodule is not None


def _lit_tune(*args, cwd):
    command = [sys.executable, "-m", "lit_tune.cli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fit_end_to_end_and_printed_config_runs_again(tmp_path):
    overrides = [
        "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.max_seq_len", "64",
    ]
    printed = _lit_tune("fit", "--config", str(ROOT / "configs/sft_tiny.yaml"), *overrides, "--print_config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    config_path = tmp_path / "printed.yaml"
    config_path.write_text(printed.stdout)
    assert yaml.safe_load(printed.stdout)["model"]["class_path"] == "lit_tune.SFTModule"

    result = _lit_tune("fit", "--config", str(config_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "hf_model" / "model.safetensors").is_file()
    assert list(version.glob("events.out.tfevents.*"))

    # The checkpoint resumes with --ckpt_path and trains two more steps.
    resumed = _lit_tune(
        "fit", "--config", str(config_path), "--trainer.max_steps", "6",
        "--ckpt_path", str(version / "checkpoints" / "last.ckpt"), cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_validate_subcommand(tmp_path):
    result = _lit_tune(
        "validate", "--config", str(ROOT / "configs/sft_tiny.yaml"),
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/loss" in result.stdout


def test_unknown_key_is_rejected(tmp_path):
    result = _lit_tune("fit", "--config", str(ROOT / "configs/sft_tiny.yaml"), "--model.init_args.lerning_rate", "1", cwd=tmp_path)
    assert result.returncode != 0
    assert "lerning_rate" in result.stderr


def test_user_classes_by_class_path(tmp_path):
    cli = LitTuneCLI(
        args=[
            "fit",
            "--model=tests.cli.user_classes.PlainRegression",
            "--data=tests.cli.user_classes.PlainData",
            "--trainer.max_steps=3",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert type(cli.model).__name__ == "PlainRegression"
    assert cli.trainer.global_step == 3


def test_predict_subcommand_writes_jsonl(tmp_path):
    result = _lit_tune(
        "predict", "--config", str(ROOT / "configs/sft_tiny.yaml"), "--model.init_args.max_new_tokens", "4",
        "--trainer.limit_predict_batches", "1", "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(tmp_path.rglob("predictions.jsonl"))
    assert len(written) == 1
    assert len(written[0].read_text().splitlines()) == 16  # one batch of the config's batch size


def test_wrong_type_is_rejected_with_key_name():
    with pytest.raises(SystemExit):
        _ParseOnly(args=["--config", str(ROOT / "configs/sft_tiny.yaml"), "--data.init_args.batch_size", "eight"], run=False)


def test_wrong_type_message_names_key(tmp_path):
    result = _lit_tune("fit", "--config", str(ROOT / "configs/sft_tiny.yaml"), "--data.init_args.batch_size", "eight", cwd=tmp_path)
    assert result.returncode != 0
    assert "batch_size" in result.stderr
    assert "eight" in result.stderr


def test_ckpt_hparams_yield_to_command_line(tmp_path):
    # Fit with a value that only the checkpoint records, then validate giving another value.
    common = ["--config", str(ROOT / "configs/sft_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    fit = _lit_tune(
        "fit", *common, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
        "--model.init_args.label_smoothing", "0.25", "--model.init_args.export", "false", cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    checkpoint = next(tmp_path.rglob("last.ckpt"))

    cli = LitTuneCLI(
        args=["validate", *common, "--ckpt_path", str(checkpoint), "--model.init_args.max_new_tokens", "8",
              "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"],
    )
    assert cli.model.hparams.max_new_tokens == 8  # the command line wins
    assert cli.model.hparams.label_smoothing == 0.25  # filled from the checkpoint
    assert cli.model.hparams.model == "tiny"  # the config file, equal to the checkpoint here


def test_ckpt_path_last_resumes_newest_earlier_run(tmp_path):
    common = ["--config", str(ROOT / "configs/sft_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--trainer.limit_val_batches", "1", "--model.init_args.export", "false",
              "--trainer.enable_progress_bar", "false"]
    first = _lit_tune("fit", *common, "--trainer.max_steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert saved.is_file()

    cli = LitTuneCLI(args=["fit", *common, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(saved)  # found in version_0, not in this run's version_1
    assert cli.trainer.global_step == 3
