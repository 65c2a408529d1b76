"""The commands (``ldir-train``, ``ldir-reconstruct``, ``ldir-sample``, ``make demo``) and what only they need:
Hydra's config folder, reports, prediction writers. The library below (``physics``, ``data``, ``models``,
``sampling``) never imports from here."""
