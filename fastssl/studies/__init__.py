"""Sweeps and studies: many pretraining runs from one config, and their report.

* :mod:`.grid` -- ``key=v1,v2`` axes (comma splitting outside brackets/quotes), product or zip;
* :mod:`.manifest` -- the sweep directory, ``sweep.json`` (atomic), ``point.json``,
  ``attempts.jsonl``, the runner lock;
* :mod:`.runner` -- one point: ``fastssl.trainer.train`` with ``train.resume=auto``;
* :mod:`.launchers` -- serial (a process per point), local-jobs / slurm (submitit), inline;
* :mod:`.sweep` -- ``fastssl sweep``; :mod:`.diversity` and :mod:`.inflation` -- ``fastssl study``;
* :mod:`.frechet` -- Fréchet distance of the pretraining stream to the downstream set;
* :mod:`.report` and :mod:`.plots` -- ``fastssl report``;
* :mod:`.commands` -- the command-line parsers.
"""
