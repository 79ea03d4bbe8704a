"""The long-tail evaluation protocol (BCL, Zhou et al. 2022): full / n-shot linear probes and
many / medium / few class groups, as numbers equal to their parts, with definitions, through
``final_eval`` and through ``fastssl eval RUN --few-shot ... --groups`` in a fresh process.

The long-tailed set: class c keeps int(40 * 0.1 ** (c / 9)) samples (40, 30, 23, 18, 14, 11, 8,
6, 5, 4); with many > 20 and few < 8 the groups are classes 0-2, 3-6 and 7-9.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from datafiles import labelled_images, write_npz

from fastssl.config import from_dict
from fastssl.eval import (
    class_counts,
    few_shot_indices,
    final_eval,
    group_accuracy,
    knn_predict,
    linear_probe,
    longtail_protocol,
    mixture_class_counts,
    short_classes,
)
from loaders.base import ArraySource
from loaders.errors import ConfigError
from loaders.mixture import Mixture

REPO = Path(__file__).resolve().parents[1]
LT_COUNTS = np.array([int(40 * 0.1 ** (c / 9)) for c in range(10)])
LIN = dict(epochs=10, lr=0.05, batch_size=64)
GROUP_KEYS = [f"{p}_top1_{g}" for p in ("linear", "knn") for g in ("many", "medium", "few")]


def _features(counts, seed):
    """Gaussian clusters: ``counts[c]`` samples of class c, ``float [N, 8]`` and ``int64 [N]``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(counts), 8, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    return centers[y] + torch.randn(len(y), 8, generator=g), y


def test_longtail_protocol_equals_its_parts():
    assert LT_COUNTS.tolist() == [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]
    x, y = _features(LT_COUNTS, 0)
    xt, yt = _features([6] * 10, 1)
    knn = knn_predict(x, y, xt, num_classes=10, k=5).argmax(1)
    out = longtail_protocol(x, y, xt, yt, num_classes=10, few_shot=[4, 2], seeds=3, groups=True, many=20, few=8,
                            linear_kwargs=LIN, knn_pred=knn)
    full = linear_probe(x, y, xt, yt, num_classes=10, **LIN)
    assert out["linear_top1"] == full["accuracy"]
    for n in (4, 2):
        accs = []
        for s in range(3):
            idx = few_shot_indices(y.numpy(), n, seed=s)
            assert np.all(np.bincount(y.numpy()[idx], minlength=10) == n)      # balanced
            assert np.array_equal(idx, few_shot_indices(y.numpy(), n, seed=s))  # seeded
            accs.append(linear_probe(x[idx], y[idx], xt, yt, num_classes=10, **{**LIN, "seed": s})["accuracy"])
        assert not np.array_equal(few_shot_indices(y.numpy(), n, seed=0), few_shot_indices(y.numpy(), n, seed=1))
        assert out[f"linear_top1_{n}shot"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert out[f"linear_top1_{n}shot_std"] == pytest.approx(np.std(accs), abs=1e-12)
    # groups from the training labels' counts (no train_counts given), full probe and kNN
    assert (out["classes_many"], out["classes_medium"], out["classes_few"]) == (3, 4, 3)
    for prefix, pred in (("linear_top1", full["pred"]), ("knn_top1", knn)):
        ref = group_accuracy(pred.numpy(), yt.numpy(), class_counts(y), many=20, few=8)
        assert {g: out[f"{prefix}_{g}"] for g in ("many", "medium", "few")} == {g: ref[g] for g in ref if g != "all"}
    # given counts (the pretraining split's) decide the groups, padded to num_classes
    given = LT_COUNTS[::-1][:9]                     # class 9 missing: 0 images -> few
    out2 = longtail_protocol(x, y, xt, yt, num_classes=10, groups=True, many=20, few=8, linear_kwargs=LIN)
    out3 = longtail_protocol(x, y, xt, yt, num_classes=10, groups=True, many=20, few=8, linear_kwargs=LIN,
                             train_counts=given)
    ref = group_accuracy(full["pred"].numpy(), yt.numpy(), np.append(given, 0), many=20, few=8)
    assert out3["linear_top1_many"] == ref["many"] and out3["linear_top1_few"] == ref["few"]
    assert (out3["classes_many"], out3["classes_medium"], out3["classes_few"]) == (2, 4, 4)
    assert out2["linear_top1"] == out3["linear_top1"] and "knn_top1_many" not in out2


def test_short_classes_make_nan_and_no_linear_refuses_few_shot():
    x, y = _features(LT_COUNTS, 0)
    assert short_classes(y.numpy(), 5) == [(9, 4)]
    out = longtail_protocol(x, y, x, y, num_classes=10, few_shot=[5], seeds=2, linear_kwargs=LIN)
    assert math.isnan(out["linear_top1_5shot"]) and math.isnan(out["linear_top1_5shot_std"])
    assert not math.isnan(out["linear_top1"])
    with pytest.raises(ValueError, match="few_shot needs linear"):
        longtail_protocol(x, y, x, y, num_classes=10, few_shot=[2], linear=False)


def test_mixture_class_counts_unique_labelled_images():
    labels = np.array([0, 0, 1, 2, 2, 2, -1, 1])
    src = ArraySource(np.zeros((8, 2, 2, 3), np.uint8), labels)
    gen = ArraySource(np.zeros((3, 2, 2, 3), np.uint8), np.full(3, -1))
    mix = Mixture([8, 3], dups=[10, 1])              # dup does not multiply counts; -1 is not counted
    assert mixture_class_counts([src, gen], mix, num_classes=4).tolist() == [2, 2, 3, 0]
    half = Mixture([8, 3], fractions=[0.5, None])    # a fraction counts its subset only
    sub = labels[half.subset(0)]
    assert mixture_class_counts([src, gen], half).tolist() == np.bincount(sub[sub >= 0], minlength=3).tolist()


def test_eval_config_keys_default_off_and_validated():
    ev = from_dict({}).eval
    assert (ev.few_shot, ev.few_shot_seeds, ev.groups, ev.group_many, ev.group_few) == ([], 5, False, 100, 20)
    assert from_dict({"eval": {"few_shot": [100, 50], "groups": True}}).eval.few_shot == [100, 50]
    for bad, key in (({"few_shot": [0]}, "eval.few_shot"), ({"few_shot": [5, 5]}, "eval.few_shot"),
                     ({"few_shot": "100"}, "eval.few_shot"), ({"few_shot": [5], "linear": False}, "eval.few_shot"),
                     ({"few_shot_seeds": 0}, "eval.few_shot_seeds"), ({"group_few": 0}, "eval.group_few"),
                     ({"group_many": 20, "group_few": 20}, "eval.group_many")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            from_dict({"eval": bad})
        assert "\n" not in str(e.value)


class _Pool(nn.Module):
    """A fixed 'encoder': 4x4 average pooling of the normalised image, flattened."""

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 4).flatten(1)


def test_final_eval_writes_every_number_with_its_definition(tmp_path, capsys):
    images, labels = labelled_images(120, 8, seed=0)           # balanced: 12 per class
    t_images, t_labels = labelled_images(50, 8, seed=1)
    cfg = from_dict({"eval": {"few_shot": [6, 3], "few_shot_seeds": 2, "groups": True, "group_many": 20,
                              "group_few": 8, "linear_epochs": 3, "knn_k": 5, "random_init_baseline": False,
                              "mean": [0.5] * 3, "std": [0.25] * 3}, "log": {"progress": False}})
    sources = (ArraySource(images, labels), ArraySource(t_images, t_labels))
    out = final_eval(cfg, _Pool(), sources, "cpu", run_dir=tmp_path, train_counts=LT_COUNTS)
    doc = json.loads((tmp_path / "eval.json").read_text())
    keys = ["linear_top1", "linear_top1_6shot", "linear_top1_6shot_std", "linear_top1_3shot",
            "linear_top1_3shot_std", "classes_many", *GROUP_KEYS, "knn_top1", "chance", "seconds"]
    for k in keys:
        assert f"eval/{k}" in out and f"eval/{k}" in doc and doc["definitions"][f"eval/{k}"], k
    assert set(doc["definitions"]) == set(out)
    assert "balanced 6-per-class subset of eval.train" in doc["definitions"]["eval/linear_top1_6shot"]
    assert "mean of 2 subset seeds" in doc["definitions"]["eval/linear_top1_6shot"]
    assert "pretraining split" in doc["definitions"]["eval/linear_top1_few"]
    assert doc["group_counts"]["per_class"] == LT_COUNTS.tolist() and doc["eval/classes_few"] == 3
    printed = capsys.readouterr().out
    assert all(f"eval/{k} " in printed for k in keys) and "definition" in printed
    # without train_counts the groups come from eval.train's labels (12 each: all medium), and say so
    cfg.eval.few_shot = [13]                                  # more than eval.train has: null, and why
    out = final_eval(cfg, _Pool(), sources, "cpu", run_dir=tmp_path)
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["group_counts"]["per_class"] == [12] * 10 and "labels of eval.train" in doc["group_counts"]["origin"]
    assert doc["eval/classes_medium"] == 10 and doc["eval/linear_top1_many"] is None
    assert doc["eval/linear_top1_13shot"] is None and math.isnan(out["eval/linear_top1_13shot"])
    assert "fewer than 13" in doc["definitions"]["eval/linear_top1_13shot"]


# ------------------------------------------------------------------------ fastssl eval, fresh process
def _fastssl(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "fastssl", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _ok(res):
    assert res.returncode == 0, (f"exit {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n"
                                 f"--- stderr\n{res.stderr[-4000:]}")
    return res.stdout


def test_fastssl_eval_few_shot_and_groups_on_a_long_tailed_run(tmp_path):
    """Pretrain on a long-tailed npz, evaluate on a balanced one: the groups are counted in the
    pretraining data, the few-shot subsets drawn from eval.train; the trainer's eval.json stays."""
    images, labels = labelled_images(400, 16, seed=0)
    keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(LT_COUNTS)])
    lt = write_npz(tmp_path / "lt.npz", images[keep], labels[keep])
    bal = write_npz(tmp_path / "bal.npz", images[:120], labels[:120])   # 12 per class
    test = write_npz(tmp_path / "test.npz", *labelled_images(50, 16, seed=1))
    cfg = {"data": {"sources": [{"name": "lt", **lt}], "batch_size": 16, "num_workers": 0},
           "augment": {"preset": "symmetric", "size": 16},
           "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
           "model": {"width": 4}, "optim": {"warmup_steps": 1}, "train": {"steps": 2},
           "eval": {"train": bal, "test": test, "knn_k": 5, "linear_epochs": 2, "random_init_baseline": False,
                    "few_shot": [5], "few_shot_seeds": 2, "groups": True},
           "log": {"progress": False, "tensorboard": False, "plot": False}}
    (tmp_path / "lt.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    printed = _ok(_fastssl("pretrain", tmp_path / "lt.yaml", "--out", run, cwd=tmp_path))
    trainer_doc = (run / "eval.json").read_text()
    assert "eval/linear_top1_5shot " in printed and "eval/linear_top1_5shot" in json.loads(trainer_doc)

    printed = _ok(_fastssl("eval", run, "--few-shot", 10, 5, "--few-shot-seeds", 3, "--groups", "--group-many", 20,
                           "--group-few", 8, cwd=tmp_path))
    assert "kNN top-1:" in printed and "linear-probe top-1:" in printed
    keys = ["linear_top1", "linear_top1_10shot", "linear_top1_10shot_std", "linear_top1_5shot", *GROUP_KEYS]
    assert all(f"eval/{k} " in printed for k in keys), printed
    doc = json.loads((run / "eval_cli.json").read_text())
    assert all(doc[f"eval/{k}"] is not None and doc["definitions"][f"eval/{k}"] for k in keys)
    assert "mean of 3 subset seeds" in doc["definitions"]["eval/linear_top1_10shot"]
    assert doc["group_counts"]["per_class"] == LT_COUNTS.tolist()
    assert "pretraining data" in doc["group_counts"]["origin"]
    assert (doc["eval/classes_many"], doc["eval/classes_medium"], doc["eval/classes_few"]) == (3, 4, 3)
    assert (run / "eval.json").read_text() == trainer_doc

    # kNN only: no probes (config few_shot dropped), kNN groups remain; --out elsewhere
    printed = _ok(_fastssl("eval", run, "--no-linear", "--out", tmp_path / "knn.json", cwd=tmp_path))
    doc = json.loads((tmp_path / "knn.json").read_text())
    assert "eval/knn_top1_many" in doc and not any(k.startswith("eval/linear") for k in doc), doc
    res = _fastssl("eval", run, "--no-linear", "--few-shot", 5, cwd=tmp_path)
    assert res.returncode == 2 and "--few-shot" in res.stderr and len(res.stderr.strip().splitlines()) == 1
