"""Model files and the store compatibility check: weights load without code, mismatches are named."""

from dataclasses import replace

import pytest
import torch

from atlasvi.data import open_store
from atlasvi.models.saving import IncompatibleStoreError, check_compatible, load_model, save_model, saved_schema


def test_save_load_round_trip_keeps_the_registry(kang_store, tmp_path):
    schema = open_store(kang_store).schema
    state = {"w": torch.arange(6.0).view(2, 3)}
    save_model(tmp_path / "m", "SCVI", {"model": {"n_latent": 3}}, schema, state)
    meta, loaded = load_model(tmp_path / "m", "SCVI")
    assert torch.equal(loaded["w"], state["w"]) and meta["config"]["model"]["n_latent"] == 3
    assert saved_schema(meta, schema.n_cells) == schema
    assert not list((tmp_path / "m").glob("*.partial"))


def test_every_mismatch_is_named(kang_store):
    store = open_store(kang_store).schema
    keys = ("sample",)
    assert torch.equal(check_compatible(store, store, keys, "s")["sample"], torch.arange(4))
    reordered = replace(store, gene_ids=store.gene_ids[::-1])
    with pytest.raises(IncompatibleStoreError, match="s: the model was trained on 1267 genes.*other order"):
        check_compatible(store, reordered, keys, "s")
    fewer = replace(store, gene_ids=store.gene_ids[:-2], n_genes=1265)
    with pytest.raises(IncompatibleStoreError, match=r"2 of the model's genes are missing"):
        check_compatible(store, fewer, keys, "s")
    no_key = replace(store, categorical={k: v for k, v in store.categorical.items() if k != "sample"})
    with pytest.raises(IncompatibleStoreError, match="obs key 'sample', which the model uses, is not in the store"):
        check_compatible(store, no_key, keys, "s")
    unseen = replace(store, categorical=store.categorical | {"sample": ("ctrl101", "stim999")})
    with pytest.raises(IncompatibleStoreError, match=r"categories the model has not seen: \['stim999'\]"):
        check_compatible(store, unseen, keys, "s")
    subset = replace(store, categorical=store.categorical | {"sample": ("stim107", "ctrl101")})
    assert check_compatible(store, subset, keys, "s")["sample"].tolist() == [3, 0]  # recoded to the model's codes
