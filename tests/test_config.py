"""Config loading: merged files, overrides, and errors that name the key."""
import pytest

from rtdist.config import Config, ConfigError, load_config
from rtdist.parallel import ParallelDims

PRESETS = ["tiny", "pg19", "wikitext103", "enwik8", "imagenet64"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    assert isinstance(load_config(f"configs/{name}.yaml"), Config)


def test_pg19_preset_is_the_papers_model():
    m = load_config("configs/pg19.yaml").model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_local_attn_heads) == (22, 1032, 8, 6)
    assert (m.num_clusters, m.window_size, m.local_window_size, m.routing_layers) == (16, 512, 256, [-1])


def test_later_files_and_overrides_win(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  d_model: 64\ntrain:\n  lr: 0.5\n")
    cfg = load_config(["configs/tiny.yaml", str(extra)], ["train.lr=1e-4", "train.min_lr=1e-5", "model.routing_layers=[-1]"])
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 2  # merged, not replaced
    assert cfg.train.lr == 1e-4 and cfg.model.routing_layers == [-1]


def test_deepspeed_keys_pass_through(tmp_path):
    f = tmp_path / "ds.yaml"
    f.write_text("train:\n  zero_stage: 3\ndeepspeed:\n  zero_optimization:\n    stage: 3\n    overlap_comm: true\n")
    assert load_config(str(f)).deepspeed == {"zero_optimization": {"stage": 3, "overlap_comm": True}}


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage (3) contradicts train.zero_stage (2): "
                                            "set train.zero_stage only"),
    ("deepspeed.train_micro_batch_size_per_gpu=8", "contradicts train.train_micro_batch_size_per_gpu (4)"),
    ("deepspeed.gradient_accumulation_steps=4", "contradicts train.gradient_accumulation_steps (1)"),
    ("deepspeed.train_batch_size=64", "deepspeed.train_batch_size (64) contradicts train.train_batch_size (None): set "
                                      "train.train_batch_size only (unset, it is derived)"),
    ("deepspeed.gradient_clipping=0.5", "deepspeed.gradient_clipping (0.5) contradicts train.gradient_clipping (1.0)"),
    ("deepspeed.bf16={enabled: true}", "deepspeed.bf16.enabled (True) contradicts train.precision ('fp32')"),
    ("deepspeed.fp16={enabled: true}", "deepspeed.fp16.enabled (True) contradicts train.precision ('fp32'): rtdist "
                                       "trains in fp32 or bf16"),
    ("deepspeed.optimizer={type: Adam, params: {lr: 0.1}}", "deepspeed.optimizer would be ignored: rtdist gives "
                                                            "DeepSpeed its own AdamW from train.lr"),
    ("deepspeed.scheduler={type: WarmupLR}", "deepspeed.scheduler would be ignored"),
])
def test_a_deepspeed_key_that_contradicts_its_train_key_is_an_error_naming_both(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert message in str(e.value)
    load_config("configs/tiny.yaml", ["deepspeed.zero_optimization.stage=2", "deepspeed.bf16={enabled: false}",
                                      "deepspeed.train_micro_batch_size_per_gpu=4"])  # agreeing: fine


@pytest.mark.parametrize("override, message", [
    ("model.windw_size=64", "unknown key 'model.windw_size' (did you mean 'model.window_size'?)"),
    ("trian.lr=1", "unknown key 'trian' (did you mean 'train'?)"),
    ("model.n_layers=two", "model.n_layers: expected an integer, got 'two'"),
    ("model.n_layers=2.5", "model.n_layers: expected an integer, got 2.5"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("model.routing_mode=casual", "model.routing_mode: 'casual' is not one of ['causal', 'topk'] (did you mean 'causal'?)"),
    ("train.seq_length=100", "train.seq_length (100) must be divisible by the local window"),
    ("model.n_local_attn_heads=5", "model.n_local_attn_heads (5) must be between 0 and model.n_heads (4)"),
    ("model.routing_layers=[7]", "model.routing_layers entry 7 is outside the 2 layers"),
    ("model.shared_qk=1", "model.shared_qk: expected true/false, got 1"),
    ("model.d_model=130", "model.d_model (130) must be divisible by model.n_heads (4)"),
    ("parallel.sequence_parallel_size=3", "train.seq_length (256) must be divisible by parallel.sequence_parallel_size"),
    ("model", "override 'model' must look like key.sub=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert message in str(e.value)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml' is not valid YAML"):
        load_config(str(bad))


def test_batch_triple_must_match_world():
    cfg = load_config("configs/tiny.yaml", ["train.train_batch_size=16", "train.train_micro_batch_size_per_gpu=4"])
    t = cfg.train
    dims = ParallelDims(cfg.parallel.sequence_parallel_size, 4)
    dims.check_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps, t.train_batch_size)
    assert dims.dp == 4
    with pytest.raises(ConfigError, match=r"train.train_batch_size \(16\) must equal .* = 8"):
        ParallelDims(1, 2).check_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps,
                                       t.train_batch_size)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        ParallelDims(2, 3)


def test_every_key_is_documented_once_and_help_config_prints_them_all():
    import dataclasses
    import subprocess
    import sys

    from rtdist.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
    undocumented = [f"{cls.__name__}.{f.name}" for cls in (Config, ModelConfig, DataConfig, TrainConfig, ParallelConfig)
                    for f in dataclasses.fields(cls) if not f.metadata.get("help") and cls is not Config]
    assert undocumented == []
    out = subprocess.run([sys.executable, "-m", "rtdist.train", "--help-config"], capture_output=True, text=True,
                         check=True).stdout
    for cls, section in ((ModelConfig, "model"), (DataConfig, "data"), (TrainConfig, "train")):
        for f in dataclasses.fields(cls):
            assert f"  {section}.{f.name} (" in out
    assert "  train.keep_last (int or null, default None): complete checkpoints to keep" in out


def test_the_keys_a_resume_must_match_are_the_models_shape():
    from rtdist.config import shape_keys
    assert shape_keys() == ["vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "emb_dim", "attention_type",
                            "n_local_attn_heads", "routing_layers", "num_clusters", "shared_qk", "ff_mult", "ff_glu",
                            "pos_emb", "tie_embedding"]


def test_vocab_size_unset_in_the_yaml_is_the_manifests_tokenizers(tmp_path):
    import json
    manifest = tmp_path / "x-manifest.json"
    manifest.write_text(json.dumps({"tokenizer": {"kind": "sentencepiece", "vocab_size": 32000}}))
    assert load_config("configs/tiny.yaml", [f"data.manifest={manifest}"]).model.vocab_size == 32000
    assert load_config("configs/tiny.yaml", [f"data.manifest={manifest}", "model.vocab_size=32768"]) \
        .model.vocab_size == 32768  # a value given wins (a smaller one is refused when training reads the shards)
    assert load_config("configs/tiny.yaml").model.vocab_size == 257  # no manifest: bytes + EOD
