"""``ldir-train``: train the prior (VAE, latent DDPM, pixel DDPM) with Lightning, configured by Hydra.

``stage=prior`` (default) trains the VAE, then the latent DDPM on it, and exports the bundle to
``stages.ldm.export_dir`` (``OUT/prior``). ``stage=vae|ldm|pixel_ddpm`` runs one stage. The Hydra app
returns the stage's validation metric so ``-m`` sweeps (e.g. ``hparams_search=vae_optuna``) can optimise it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from ldir_pl.apps.cli import command_run, run_hydra_app
from ldir_pl.atomic import write_json
from ldir_pl.config import CONF_DIR, compose
from ldir_pl.data.base import split_record
from ldir_pl.errors import ConfigError, MissingPathError
from ldir_pl.models.bundle import save_prior
from ldir_pl.models.intensity import DEFAULT as INTENSITY
from ldir_pl.models.stop_on_signal import StopOnSignal
from ldir_pl.models.training import CKPT_KIND_KEY

log = logging.getLogger(__name__)

STAGES = ("vae", "ldm", "pixel_ddpm", "prior")


class Stage(NamedTuple):
    model_key: str    # model.<key> in the config
    kind: str         # the checkpoint kind its module writes
    metric: str       # validation metric it reports (and checkpoints on) unless optimized_metric is set
    mode: str         # max | min
    seed_offset: int  # seed = cfg.seed + offset: each stage draws its own random stream


STAGE_INFO = {
    "vae": Stage("vae", "vae", "val/psnr", "max", 0),
    "ldm": Stage("ldm", "latent", "val/loss", "min", 1),
    "pixel_ddpm": Stage("pixel_ddpm", "pixel", "val/loss", "min", 2),
}


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def stage_metric(cfg: DictConfig, stage: str) -> tuple[str, str]:
    """(metric, mode) a stage reports: ``optimized_metric`` if set, else the stage default."""
    metric, mode = STAGE_INFO[stage].metric, STAGE_INFO[stage].mode
    if cfg.get("optimized_metric"):
        metric = cfg.optimized_metric
        mode = cfg.get("optimized_mode") or ("max" if any(k in metric for k in ("psnr", "ssim")) else "min")
    return metric, mode


def checkpoint_kind(path: str | Path) -> str | None:
    """The ``ldir_kind`` stored in a Lightning checkpoint (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"ckpt_path={path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised naming the file
        raise ConfigError(f"ckpt_path={path}: not a readable torch checkpoint ({err})") from err
    return ckpt.get(CKPT_KIND_KEY) if isinstance(ckpt, dict) else None


def _stage_section(cfg: DictConfig, stage: str) -> DictConfig:
    return cfg.stages.get(stage) or OmegaConf.create({})


def _merged(base: DictConfig, extra: Any) -> DictConfig:
    return OmegaConf.merge(base, extra or {})


def _callbacks(cfg: DictConfig, stage: str, stage_dir: Path, has_logger: bool) -> list[pl.Callback]:
    """The configured callbacks; checkpoints go to the stage's folder and watch its metric unless set."""
    metric, mode = stage_metric(cfg, stage)
    callbacks = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if not isinstance(cb_cfg, DictConfig) or "_target_" not in cb_cfg:
            continue
        cls = hydra.utils.get_class(cb_cfg._target_)
        if issubclass(cls, LearningRateMonitor) and not has_logger:
            continue  # Lightning refuses it without a logger
        extra: dict[str, Any] = {}
        if issubclass(cls, ModelCheckpoint):
            extra["dirpath"] = cb_cfg.get("dirpath") or str(stage_dir / "checkpoints")
            if cb_cfg.get("monitor") is None:
                extra.update(monitor=metric, mode=mode)
        callbacks.append(hydra.utils.instantiate(cb_cfg, **extra))
        log.debug("callback %s: %s", name, type(callbacks[-1]).__name__)
    return [*callbacks, StopOnSignal(stage_dir / "checkpoints")]  # always: a signal stops at the next batch


def _logger(cfg: DictConfig, stage: str, stage_dir: Path):
    """The configured logger, one run (W&B) or folder (CSV, TensorBoard) per stage."""
    lcfg = cfg.get("logger")
    if not lcfg or "_target_" not in lcfg:
        return False
    cls = hydra.utils.get_class(lcfg._target_)
    extra: dict[str, Any] = {}
    if issubclass(cls, WandbLogger):
        extra = {"name": f"{cfg.experiment_name}-{stage}", "job_type": stage}
    elif issubclass(cls, (CSVLogger, TensorBoardLogger)):
        extra = {"save_dir": str(stage_dir), "name": "logs"}
    logger = hydra.utils.instantiate(lcfg, **extra)
    logger.log_hyperparams({"run_config": _plain(cfg)})  # the whole Hydra config, next to the module's hparams
    return logger


def _finish_logger(trainer: pl.Trainer) -> None:
    """Close the W&B run so the next stage starts its own."""
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero:
            lg.experiment.finish()


def _log_artifact(trainer: pl.Trainer, path: Path, name: str, kind: str) -> None:
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero:
            import wandb

            art = wandb.Artifact(name=name, type=kind)
            art.add_dir(str(path))
            lg.experiment.log_artifact(art)


def _images_per_second(trainer: pl.Trainer, batch_size: int, seconds: float) -> float:
    return trainer.global_step * batch_size * trainer.world_size / max(seconds, 1e-9)


def fit_stage(cfg: DictConfig, stage: str, ckpt_path: str | None = None, **model_overrides: Any) -> dict:
    """Train one stage; returns ``{"module", "trainer", "metric", "value", "images_per_s", "seconds"}``."""
    model_key, kind = STAGE_INFO[stage].model_key, STAGE_INFO[stage].kind
    section = _stage_section(cfg, stage)
    stage_dir = Path(cfg.output_dir) / stage
    pl.seed_everything(int(cfg.seed) + STAGE_INFO[stage].seed_offset, workers=True, verbose=False)

    data_cfg = _merged(cfg.data, section.get("data"))
    model_cfg = OmegaConf.merge(cfg.model[model_key], model_overrides)
    trainer_cfg = _merged(cfg.trainer, section.get("trainer"))
    # Everything that can fail on a bad setting (missing VAE, wrong checkpoint kind) fails here,
    # before the trainer starts.
    if ckpt_path and ckpt_path != "last":
        found = checkpoint_kind(ckpt_path)
        if found != kind:
            raise ConfigError(f"ckpt_path={ckpt_path} holds a {found or 'non-ldir'} checkpoint; stage {stage!r} needs {kind!r}")
    module = hydra.utils.instantiate(model_cfg, _convert_="all")
    datamodule = hydra.utils.instantiate(data_cfg, _convert_="all")
    logger = _logger(cfg, stage, stage_dir)
    trainer: pl.Trainer = hydra.utils.instantiate(
        trainer_cfg,
        default_root_dir=str(stage_dir),
        callbacks=_callbacks(cfg, stage, stage_dir, has_logger=bool(logger)),
        logger=logger,
        _convert_="all",
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    seconds = time.perf_counter() - start
    metric, _ = stage_metric(cfg, stage)
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_score if ckpt_cb is not None and ckpt_cb.monitor == metric else None
    value = best if best is not None else trainer.callback_metrics.get(metric)  # what the export holds
    result = {
        "module": module,
        "trainer": trainer,
        "metric": metric,
        "value": float(value) if value is not None else float("nan"),
        "seconds": seconds,
        "images_per_s": _images_per_second(trainer, int(data_cfg.batch_size), seconds),
        "images_seen": trainer.global_step * int(data_cfg.batch_size) * trainer.world_size,
        "epochs": trainer.current_epoch,
    }
    log.info("stage %s: %s=%.4f, %.1f s, %.2f images/s (incl. validation)", stage, metric, result["value"],
             seconds, result["images_per_s"])
    return result


def _load_best(module: pl.LightningModule, trainer: pl.Trainer) -> None:
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        log.info("restored best checkpoint %s", best)


def where_it_ran(trainer: pl.Trainer) -> str:
    """The machine a stage ran on, in words (what a reader needs to weigh its minutes)."""
    if trainer.strategy.root_device.type == "cuda":
        name = torch.cuda.get_device_name(trainer.strategy.root_device)
        return f"{trainer.world_size} x {name}, {trainer.precision}"
    n = torch.get_num_threads()
    return f"CPU, {n} torch thread{'' if n == 1 else 's'}, {trainer.precision}"


def training_history(cfg: DictConfig, results: dict[str, dict]) -> list[dict]:
    """Every run that trained these weights: the ``init_from`` bundle's history, then this run's stages."""
    history: list[dict] = []
    if cfg.get("init_from"):
        meta_file = Path(str(cfg.init_from)) / "ldir_prior.json"
        if meta_file.is_file():
            history = list(json.loads(meta_file.read_text()).get("training_history", []))
    date = time.strftime("%Y-%m-%d")
    for stage, r in results.items():
        history.append({"stage": stage, "experiment": cfg.experiment_name, "date": date,
                        "minutes": round(r["seconds"] / 60, 1), "epochs": r["epochs"], "images_seen": r["images_seen"],
                        "where": where_it_ran(r["trainer"]), r["metric"]: r["value"]})
    return history


def _metadata(cfg: DictConfig, results: dict[str, dict]) -> dict:
    last = results[list(results)[-1]]["trainer"]
    return {
        "training_history": training_history(cfg, results),
        "training_data": split_record(last.datamodule) if last.datamodule is not None else {},
        "image_size": int(cfg.data.image_size),
        "intensity_transform": INTENSITY.as_dict(),
        "experiment": cfg.experiment_name,
        "validation": {s: {r["metric"]: r["value"]} for s, r in results.items()},
        "images_per_s": {s: r["images_per_s"] for s, r in results.items()},
        "train_seconds": {s: r["seconds"] for s, r in results.items()},
        "training_config": _plain(cfg),
    }


def _run_vae(cfg: DictConfig, ckpt_path: str | None, results: dict) -> Path:
    res = fit_stage(cfg, "vae", ckpt_path)
    results["vae"] = res
    trainer, module = res["trainer"], res["module"]
    export = Path(cfg.stages.vae.export_dir)
    if trainer.is_global_zero:
        _load_best(module, trainer)
        module.export(export)
        _log_artifact(trainer, export, f"vae-{cfg.experiment_name}", "model")
        log.info("VAE exported to %s", export)
    trainer.strategy.barrier("vae-export")
    _finish_logger(trainer)
    return export


def _run_diffusion(cfg: DictConfig, stage: str, ckpt_path: str | None, results: dict, **overrides: Any) -> Path:
    res = fit_stage(cfg, stage, ckpt_path, **overrides)
    results[stage] = res
    trainer, module = res["trainer"], res["module"]
    export = Path(_stage_section(cfg, stage).export_dir)
    if trainer.is_global_zero:
        _load_best(module, trainer)  # the exported UNet is the one validation chose, not the last epoch's
        vae = module.export_vae() if stage == "ldm" else None
        meta = _metadata(cfg, results)
        if vae is not None:
            meta["scaling_factor"] = float(module.scaling_factor)
        save_prior(export, vae, module.export_unet(), module.noise_scheduler, meta)
        _log_artifact(trainer, export, f"prior-{cfg.experiment_name}-{stage}", "prior")
        log.info("prior bundle exported to %s", export)
    trainer.strategy.barrier("prior-export")
    _finish_logger(trainer)
    return export


def run(cfg: DictConfig) -> tuple[Path, float]:
    """Run ``cfg.stage``; returns (main output folder, validation metric of the last stage)."""
    stage = cfg.stage
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r}: expected one of {STAGES}")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    torch.set_float32_matmul_precision("high")
    ckpt = cfg.get("ckpt_path")
    ckpt = str(ckpt) if ckpt else None
    results: dict[str, dict] = {}
    if stage == "vae":
        out = _run_vae(cfg, ckpt, results)
    elif stage == "ldm":  # continuing a bundle's UNet means keeping its VAE: its weights live in that latent space
        vae = {"vae_path": str(cfg.init_from)} if cfg.get("init_from") else {}
        out = _run_diffusion(cfg, "ldm", ckpt, results, **vae)
    elif stage == "pixel_ddpm":
        out = _run_diffusion(cfg, "pixel_ddpm", ckpt, results)
    else:  # prior: an explicit checkpoint resumes the stage of its kind
        kind = checkpoint_kind(ckpt) if ckpt and ckpt != "last" else None
        if kind not in (None, "vae", "latent"):
            raise ConfigError(f"ckpt_path={ckpt} holds a {kind!r} checkpoint; stage=prior resumes 'vae' or 'latent' ones")
        vae_ckpt = ckpt if ckpt == "last" or kind == "vae" else None
        ldm_ckpt = ckpt if ckpt == "last" or kind == "latent" else None
        vae_export = Path(cfg.stages.vae.export_dir)
        if kind == "latent":  # stage 1 is done; its export must exist
            if not vae_export.exists():
                raise MissingPathError(f"resuming the latent stage needs the stage-1 VAE at {vae_export}")
        else:
            vae_export = _run_vae(cfg, vae_ckpt, results)
        out = _run_diffusion(cfg, "ldm", ldm_ckpt, results, vae_path=str(vae_export))
    last = results[list(results)[-1]]
    if last["trainer"].is_global_zero:  # what a sweep or a reader compares, without parsing logs
        path = Path(cfg.output_dir) / "train_summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}  # a stage run alone adds to the others
        summary.update({s: {r["metric"]: r["value"], "seconds": r["seconds"], "images_per_s": r["images_per_s"],
                            "torch_threads": torch.get_num_threads()} for s, r in results.items()})
        write_json(path, summary)
    return out, last["value"]


def stage_outputs(cfg: DictConfig):
    """What an earlier run left that this one would overwrite: the folders and exports of the stages it trains.
    A stage trained alone may follow another in the same folder (stage=ldm reads OUT/vae/model), and a resumed
    run (ckpt_path) continues its own stage."""
    stages = ("vae", "ldm") if cfg.stage == "prior" else (cfg.stage,)

    def earlier(out: Path) -> list[Path]:
        if cfg.get("ckpt_path") or cfg.stage not in STAGES:
            return []
        paths = [out / s for s in stages] + [Path(str(_stage_section(cfg, s).get("export_dir", out / s)))
                                             for s in stages]
        return sorted({p for p in paths if p.exists()})

    return earlier


def train_prior(cfg: DictConfig) -> Path:
    """Train what ``cfg.stage`` says (default: VAE + latent DDPM) and return the exported folder.

    Outside a Hydra app (compose API) the config is saved as ``output_dir/config.yaml``.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(cfg.output_dir) / "config.yaml")
    return run(cfg)[0]


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The training config as ``ldir-train`` would see it, without starting a Hydra app."""
    return compose("train", overrides, return_hydra_config)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():  # in multirun each job writes into its own folder
        with open_dict(cfg):
            cfg.output_dir = HydraConfig.get().runtime.output_dir
    with command_run("ldir-train", cfg.output_dir, cfg, overwrite=bool(cfg.overwrite), earlier=stage_outputs(cfg)):
        out, value = run(cfg)
    log.info("done: %s (%s)", out, value)
    return value


def main() -> float | None:
    """Console-script entry point (``ldir-train``)."""
    return run_hydra_app("ldir-train", _hydra_main)


if __name__ == "__main__":
    main()
