"""``ldir-reconstruct``: reconstruct a data set from simulated or measured sinograms with one or more methods.

    ldir-reconstruct data=dicom data.root=DIR physics.num_views=23 sampler=ldir prior.path=OUT/prior output_dir=RES

Writes ``metrics.csv`` (per image and method), ``summary.json`` (per method: psnr, ssim, seconds_per_image,
peak_mem_mb, n), PNG panels and the reconstructions; returns the main method's mean PSNR for sweeps.
With ``-m`` each job writes into its own folder and the sweep folder gets ``table.md``,
``sweep_summary.json`` and ``psnr_vs_views.png`` over all jobs so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import WandbLogger

from ldir_pl.apps.cli import command_run, run_hydra_app
from ldir_pl.apps.predict_module import LDIRModule
from ldir_pl.apps.prediction_writer import ReconstructionWriter
from ldir_pl.apps.report import format_table, summarize, window_range, write_csv, write_json
from ldir_pl.apps.run_record import INFO_FILE, RunRecord
from ldir_pl.apps.sweep_report import write_sweep_report
from ldir_pl.config import CONF_DIR, compose_sampler
from ldir_pl.errors import ConfigError
from ldir_pl.interrupt import Interrupted

log = logging.getLogger(__name__)


def sampler_config(name: str) -> dict:
    """``conf/sampler/<name>.yaml`` composed by Hydra (so its own ``defaults`` apply), unresolved."""
    return OmegaConf.to_container(compose_sampler(name).sampler, resolve=False)


def build_methods(cfg: DictConfig) -> tuple[dict, str]:
    """(name -> method, the main method's name): the named ``baselines`` (files of ``conf/sampler/``) first,
    the main ``sampler`` last, so panels read left to right from the baselines to it. A baseline's config is
    placed in this run's config before it is built, so ``${prior.path}``, ``${seed}`` and ``${tv}`` resolve
    against this run (its physics, its data size)."""
    methods = {}
    for name in cfg.get("baselines") or []:
        root = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        root._baseline = sampler_config(name)
        method = instantiate(root._baseline)
        methods[method.name] = method
    main = instantiate(cfg.sampler)
    methods.pop(main.name, None)
    methods[main.name] = main
    return methods, main.name


def collect(output_dir: Path, world_size: int) -> list[dict]:
    """The rows every rank wrote; a rank that wrote nothing yet (stopped before its first batch) adds none."""
    rows, seen = [], set()
    for rank in range(world_size):
        part = output_dir / "parts" / f"rank{rank}.jsonl"
        lines = part.read_text().splitlines() if part.is_file() else []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            key = (row["id"], row["method"])
            if key not in seen:  # distributed samplers may repeat an image to even out shards
                seen.add(key)
                rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], r["id"]))


def dicom_sources(cfg: DictConfig, datamodule):
    """What DICOM out needs per slice (the input file: patient, study, geometry); checked before any work."""
    window_range(cfg.recon.window)  # a bad window name fails now, not at the first panel
    if not cfg.recon.dicom or cfg.recon.volume:
        return None  # volumes carry their geometry (and a DICOM series its files)
    if not hasattr(datamodule, "source_file"):
        raise ConfigError(f"recon.dicom=true needs DICOM slices (data=dicom) or volumes (recon.volume=true); "
                          f"{type(datamodule).__name__} holds slices without patient geometry")
    return datamodule.source_file


def run(cfg: DictConfig, record: RunRecord | None = None) -> dict[str, dict]:
    """Reconstruct ``cfg.data`` with the configured methods; returns the summary (rank 0). Interrupted by a
    signal, it reports the images that were complete and re-raises."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    physics = instantiate(cfg.physics)
    datamodule = instantiate(cfg.data)
    datamodule.attach_physics(physics)
    methods, main_name = build_methods(cfg)  # priors load and are checked here, before any sampling
    module = LDIRModule(methods, physics)
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
    writer = ReconstructionWriter(out, cfg.num_panels, cfg.save_reconstructions, window=cfg.recon.window,
                                  dicom=bool(cfg.recon.dicom), source_file=dicom_sources(cfg, datamodule),
                                  label=physics.label)
    trainer = pl.Trainer(**cfg.trainer, logger=logger, callbacks=[writer], inference_mode=False,
                         enable_checkpointing=False, enable_model_summary=False)
    info = {"physics": physics.describe(), "methods": list(methods), "main_method": main_name,
            "world_size": trainer.world_size}
    interrupted: Interrupted | None = None
    try:
        if cfg.recon.volume:  # one volume per batch: NIfTI out, orthogonal panels, per-volume metrics
            trainer.predict(module, dataloaders=datamodule.volume_dataloader(), return_predictions=False)
        else:
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
        trainer.strategy.barrier()
    except Interrupted as err:
        interrupted = err
    if trainer.global_rank != 0:
        if interrupted is not None:
            raise interrupted
        return {}
    rows = collect(out, trainer.world_size)
    summary = summarize(rows)
    summary = {m: summary[m] for m in methods if m in summary}  # baselines first, the main method last
    write_csv(rows, out / "metrics.csv")
    write_json(summary, out / "summary.json")
    info["images_done"] = len({r["id"] for r in rows})
    info["torch_threads"] = torch.get_num_threads()  # as the predict loop ran (Lightning shares cores out in DDP)
    if record is not None:
        record.update(**info)
    else:
        write_json(info, out / INFO_FILE)
    if interrupted is not None:  # the complete images are reported; the run is marked interrupted by the caller
        raise interrupted
    title = f"{type(datamodule).__name__}: {physics.label}"
    print(format_table(summary, title))
    panels = f", panels in {out / 'panels'}/" if any(out.glob("panels/*.png")) else ""
    print(f"per image: {out / 'metrics.csv'}; per method: {out / 'summary.json'}{panels}", flush=True)
    if isinstance(logger, WandbLogger):
        log_to_wandb(logger, summary, rows, out)
    return summary


def log_to_wandb(logger, summary: dict, rows: list[dict], out: Path) -> None:
    import wandb

    logger.log_metrics({f"{m}/{k}": v for m, s in summary.items() for k, v in s.items() if v is not None})
    table = wandb.Table(columns=["id", "method", "psnr", "ssim", "panel"])
    panels = {p.stem: p for p in (out / "panels").glob("*.png")}
    for r in rows:
        panel = panels.get(r["id"].replace("/", "_"))
        table.add_data(r["id"], r["method"], r["psnr"], r["ssim"], wandb.Image(str(panel)) if panel else None)
    logger.experiment.log({"reconstructions": table})


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="reconstruct")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    torch.set_float32_matmul_precision("high")
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if sweeping:  # every job writes into its own folder; the sweep folder gets the joint table and plot
        with open_dict(cfg):
            cfg.output_dir = hydra_cfg.runtime.output_dir
    with command_run("ldir-reconstruct", cfg.output_dir, cfg, overwrite=bool(cfg.overwrite)) as record:
        summary = run(cfg, record)
    if sweeping and summary and cfg.physics.get("num_views") is not None:  # the joint table is over views
        write_sweep_report(Path(hydra_cfg.sweep.dir))
    main_psnr = summary.get(str(cfg.sampler.name), {}).get("psnr")  # what a sweep optimises
    return float("nan") if main_psnr is None else float(main_psnr)


def main() -> float:
    """Console-script entry point (``ldir-reconstruct``)."""
    return run_hydra_app("ldir-reconstruct", _hydra_main)


if __name__ == "__main__":
    main()
