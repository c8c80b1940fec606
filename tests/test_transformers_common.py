"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) against every hf_attention head.

Every model inside transformers is tested by `tests/test_modeling_common.py` of its release; those files ship in
the transformers sdist on PyPI, not in the wheel. At setup the sdist of the installed version is fetched once with
pip (file-locked, cached under ``~/.cache/hf_attention/transformers-tests-<version>``, or
``$HF_ATTENTION_TRANSFORMERS_TESTS``) and its ``tests/`` folder is imported as the package
``hf_transformers_tests`` (our own ``tests`` has a conftest and no ``__init__``, so the names cannot clash).

The sdist lacks three helper modules that the mixins import; they are written as stubs, and what they leave out
is covered elsewhere:
- ``generation/test_utils.py`` (`GenerationTesterMixin`): generate() is tested in tests/test_generation.py;
- ``exporters/test_export.py`` (`ExportTesterMixin`, torch.export tests): not shipped, nothing to run;
- ``utils/test_configuration_utils.py``: only its ``config_common_kwargs`` dict, rebuilt here from
  `PreTrainedConfig`'s common arguments.

The mixin learns each head's task from ``transformers.models.auto.modeling_auto.*_MAPPING_NAMES``; our class names
are added there for the duration of this module (see ../shared/DESIGN.md).

Every test carries the ``transformers_common`` marker (`pytest -m transformers_common` runs only them). The whole set
(4 stacks with every head, 25 variant classes) is part of the default run: about 2 minutes with ``-n 2``.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto

import hf_attention  # noqa: F401  (registers the Auto classes)
from hf_attention import (
    HfAttentionConfig,
    HfAttentionDecoder,
    HfAttentionEncoderDecoderModel,
    HfAttentionForCausalLM,
    HfAttentionForConditionalGeneration,
    HfAttentionForImageClassification,
    HfAttentionForMaskedLM,
    HfAttentionForQuestionAnswering,
    HfAttentionForSequenceClassification,
    HfAttentionModel,
    HfAttentionVisionModel,
)

# transformers' tests check FutureWarnings (e.g. the deprecated `past_key_values=`); pyproject ignores them.
pytestmark = pytest.mark.filterwarnings("default::FutureWarning")

VERSION = transformers.__version__
PACKAGE = "hf_transformers_tests"
CACHE = Path(
    os.environ.get("HF_ATTENTION_TRANSFORMERS_TESTS", Path.home() / ".cache" / "hf_attention")
) / f"transformers-tests-{VERSION}"
# pip's messages when it cannot reach the index at all (anything else is a real failure, not a skip).
_OFFLINE_MARKERS = (
    "NewConnectionError", "ConnectTimeout", "ConnectionError", "Name or service not known",
    "Temporary failure in name resolution", "Network is unreachable", "Connection refused", "ProxyError",
    "ReadTimeout", "No route to host",
)
_STUBS = {
    "exporters/test_export.py": (
        '"""Stub: the sdist does not ship tests/exporters; the torch.export tests are not run."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "generation/test_utils.py": (
        '"""Stub: the sdist does not ship tests/generation; generate() is tested by hf_attention\'s '
        'tests/test_generation.py."""\n\n\nclass GenerationTesterMixin:\n    pass\n'
    ),
    # PreTrainedConfig's common arguments, each set away from its default (ConfigTester.check_config_arguments_init).
    "utils/test_configuration_utils.py": (
        '"""Stub: the common config arguments that ConfigTester checks are set and kept."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n    "output_hidden_states": True,\n    "output_attentions": True,\n'
        '    "dtype": "float16",\n    "chunk_size_feed_forward": 5,\n    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n    "label2id": {"label": "0"},\n    "problem_type": "regression",\n}\n'
    ),
}


def _fetch_transformers_tests() -> Path:
    """The sdist's tests/ as ``CACHE/hf_transformers_tests`` (downloaded once per version, safe across processes)."""
    from filelock import FileLock

    done = CACHE / ".complete"
    if done.exists():
        return CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / ".lock")):
        if done.exists():
            return CACHE
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "2",
                   "--timeout", "20", "--disable-pip-version-check", f"transformers=={VERSION}", "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            sdists = list(Path(tmp).glob(f"transformers-{VERSION}.tar.gz"))
            if proc.returncode != 0 or not sdists:
                output = proc.stdout + proc.stderr
                if any(marker in output for marker in _OFFLINE_MARKERS):
                    pytest.skip(f"PyPI is unreachable, so transformers {VERSION}'s sdist (which holds its common "
                                f"model tests) cannot be fetched: {output.strip().splitlines()[-1]}",
                                allow_module_level=True)
                raise RuntimeError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}):\n{output[-3000:]}")
            staging = Path(tmp) / PACKAGE
            staging.mkdir()
            prefix = f"transformers-{VERSION}/tests/"
            with tarfile.open(sdists[0]) as archive:
                for member in archive.getmembers():
                    name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                    if member.isfile() and name.endswith(".py") and "/" not in name:
                        (staging / name).write_bytes(archive.extractfile(member).read())
            if not (staging / "test_modeling_common.py").exists():
                raise RuntimeError(f"{sdists[0].name} has no tests/test_modeling_common.py")
            (staging / "__init__.py").write_text("")
            for relative, text in _STUBS.items():
                path = staging / relative
                if not path.exists():
                    path.parent.mkdir(exist_ok=True)
                    (path.parent / "__init__.py").touch()
                    path.write_text(text)
            target = CACHE / PACKAGE
            if target.exists():
                import shutil

                shutil.rmtree(target)
            staging.rename(target)
        done.touch()
    return CACHE


sys.path.insert(0, str(_fetch_transformers_tests()))
with warnings.catch_warnings():  # its marks (flash_attn_test, ...) are registered in transformers' own conftest
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
config_common = importlib.import_module(f"{PACKAGE}.test_configuration_common")
ModelTesterMixin = common.ModelTesterMixin
ConfigTester = config_common.ConfigTester
floats_tensor, ids_tensor, random_attention_mask = common.floats_tensor, common.ids_tensor, common.random_attention_mask



def _set_config_for_less_flaky_test(config):
    """transformers' helper sets every norm-epsilon name it knows (`layer_norm_epsilon`, `norm_eps`, ...); our
    config refuses names that look like typos of its own fields when a saved config is loaded, so only the
    epsilon it declares is set (the modules' epsilons are still forced by `set_model_for_less_flaky_test`)."""
    config.layer_norm_eps = 1.0


common.set_config_for_less_flaky_test = _set_config_for_less_flaky_test

# Which task each class serves, as the mixin reads it. Each test class registers only its own family's names: in
# transformers every family is its own model_type, and the mixin takes any child named in MODEL_MAPPING_NAMES for
# the head's base model (the encoder-decoder's `encoder` is an HfAttentionModel, not its base model).
TASK_MAPPINGS = {
    HfAttentionModel: "MODEL_MAPPING_NAMES",
    HfAttentionDecoder: "MODEL_MAPPING_NAMES",
    HfAttentionEncoderDecoderModel: "MODEL_MAPPING_NAMES",
    HfAttentionVisionModel: "MODEL_MAPPING_NAMES",
    HfAttentionForMaskedLM: "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    HfAttentionForSequenceClassification: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    HfAttentionForQuestionAnswering: "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    HfAttentionForCausalLM: "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    HfAttentionForConditionalGeneration: "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    HfAttentionForImageClassification: "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}


def register_task_names(classes) -> list[dict]:
    """Add `classes` under our model_type to the mixin's task mappings; returns the mappings to clean up."""
    names: dict[str, list[str]] = {}
    for cls in classes:
        names.setdefault(TASK_MAPPINGS[cls], []).append(cls.__name__)
    touched = []
    for mapping_name, class_names in names.items():
        mapping = getattr(modeling_auto, mapping_name)
        mapping[HfAttentionConfig.model_type] = tuple(class_names)
        touched.append(mapping)
    return touched


# ----------------------------------------------------------------------------------------------------------- testers
class TextModelTester:
    """Tiny configs and inputs for the text heads (BertModelTester's shape)."""

    def __init__(self, parent, batch_size=3, seq_length=7, is_training=True, vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=3, **overrides):
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads, self.num_labels = (
            num_hidden_layers, num_attention_heads, num_labels
        )
        self.overrides = overrides

    def get_config(self) -> HfAttentionConfig:
        options = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=64,
            num_labels=self.num_labels, pad_token_id=0, sparse_window_size=4, sparse_block_size=4, sparse_stride=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
        )
        options.update(self.overrides)
        return HfAttentionConfig(**options)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class DecoderModelTester(TextModelTester):
    """Same inputs; the decoder-only heads set `is_decoder` themselves."""


class Seq2SeqModelTester(TextModelTester):
    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        # One length for both sides: the mixin reuses the encoder's mask and labels for the decoder (as BART's tester).
        self.encoder_seq_length = self.decoder_seq_length = self.seq_length

    def get_config(self) -> HfAttentionConfig:
        config = super().get_config()
        config.encoder_layers = config.decoder_layers = self.num_hidden_layers
        config.decoder_start_token_id = 2
        config.is_encoder_decoder = True
        return config

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        inputs["decoder_input_ids"] = ids_tensor([self.batch_size, self.decoder_seq_length], self.vocab_size)
        inputs["decoder_attention_mask"] = torch.ones(self.batch_size, self.decoder_seq_length, dtype=torch.long)
        return config, inputs


class VisionModelTester(TextModelTester):
    def __init__(self, parent, image_size=16, patch_size=4, num_channels=3, **kwargs):
        super().__init__(parent, **kwargs)
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        prefix = 0 if kwargs.get("pooling") == "mean" else 1  # [CLS] with pooling="cls" (the default here)
        self.seq_length = (image_size // patch_size) ** 2 + prefix

    def get_config(self) -> HfAttentionConfig:
        options = dict(image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
                       position_embedding_type="learned", pooling="cls", norm_position="pre")
        options.update(self.overrides)
        self.overrides = options
        return super().get_config()

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


# --------------------------------------------------------------------------------------------------------- test cases
class _CommonTests(ModelTesterMixin):
    model_tester_class = TextModelTester
    model_tester_options: dict = {}
    test_resize_embeddings = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._task_mappings = register_task_names(cls.all_model_classes)

    @classmethod
    def tearDownClass(cls):
        for mapping in cls._task_mappings:
            mapping.pop(HfAttentionConfig.model_type, None)
        super().tearDownClass()

    def setUp(self):
        self.model_tester = self.model_tester_class(self, **self.model_tester_options)
        self.config_tester = ConfigTester(self, config_class=HfAttentionConfig, hidden_size=40)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_generation_tester_mixin_inheritance(self):
        self.skipTest("GenerationTesterMixin is in tests/generation/, which the transformers sdist does not ship; "
                      "generate() is tested by tests/test_generation.py")


class EncoderTest(_CommonTests, unittest.TestCase):
    all_model_classes = (HfAttentionModel, HfAttentionForMaskedLM, HfAttentionForSequenceClassification,
                         HfAttentionForQuestionAnswering)


class DecoderTest(_CommonTests, unittest.TestCase):
    model_tester_class = DecoderModelTester
    all_model_classes = (HfAttentionDecoder, HfAttentionForCausalLM)


class Seq2SeqTest(_CommonTests, unittest.TestCase):
    model_tester_class = Seq2SeqModelTester
    all_model_classes = (HfAttentionEncoderDecoderModel, HfAttentionForConditionalGeneration)
    is_encoder_decoder = True


class VisionTest(_CommonTests, unittest.TestCase):
    model_tester_class = VisionModelTester
    all_model_classes = (HfAttentionVisionModel, HfAttentionForImageClassification)
    test_resize_embeddings = False

    def test_model_get_set_embeddings(self):
        """ViT's version (transformers' ViTModelTest overrides it too): the input embedding is the patch conv."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, torch.nn.Linear))


# The main variants: each scoring family, each positional family, pre-norm; every head of a stack runs them.
TEXT_VARIANTS = {
    "Sinusoidal": {"position_embedding_type": "sinusoidal"},
    "Rope": {"attention_type": "rope"},
    "Alibi": {"position_embedding_type": "alibi"},
    "Relative": {"position_embedding_type": "relative"},
    "NoPositions": {"position_embedding_type": "none"},
    "Additive": {"attention_type": "additive", "position_embedding_type": "learned"},
    "SparseLocalAlibi": {"attention_type": "sparse", "sparse_pattern": "local", "position_embedding_type": "alibi"},
    "SparseStridedRelative": {"attention_type": "sparse", "sparse_pattern": "strided",
                              "position_embedding_type": "relative"},
    "SparseBlockRope": {"attention_type": "sparse", "sparse_pattern": "block", "position_embedding_type": "rope"},
    "PreNorm": {"norm_position": "pre"},
}
VISION_VARIANTS = {
    "Sinusoidal": {"position_embedding_type": "sinusoidal"},
    "Rope": {"position_embedding_type": "rope"},
    "Alibi": {"position_embedding_type": "alibi"},
    "Relative": {"position_embedding_type": "relative"},
    "Additive": {"attention_type": "additive"},
    "SparseLocal": {"attention_type": "sparse", "sparse_pattern": "local", "position_embedding_type": "rope"},
    "MeanPoolPostNorm": {"pooling": "mean", "norm_position": "post"},
}
SEQ2SEQ_VARIANTS = {name: TEXT_VARIANTS[name] for name in ("Rope", "Relative", "Additive", "SparseLocalAlibi")}
DECODER_VARIANTS = {name: TEXT_VARIANTS[name] for name in ("Rope", "Alibi", "Relative", "SparseLocalAlibi")}

for _base, _variants in ((EncoderTest, TEXT_VARIANTS), (DecoderTest, DECODER_VARIANTS),
                         (Seq2SeqTest, SEQ2SEQ_VARIANTS), (VisionTest, VISION_VARIANTS)):
    for _name, _overrides in _variants.items():
        _cls_name = _base.__name__.replace("Test", f"{_name}Test")
        globals()[_cls_name] = type(_cls_name, (_base,), {"model_tester_options": _overrides})
del _base, _variants, _name, _overrides, _cls_name  # a TestCase left in the namespace would be collected again

def _mark_tests() -> None:
    for cls in [v for v in globals().values() if isinstance(v, type) and issubclass(v, _CommonTests)]:
        if cls is _CommonTests:
            continue
        for name in [n for n in dir(cls) if n.startswith("test")]:
            func = getattr(cls, name)
            if not callable(func):
                continue
            setattr(cls, name, pytest.mark.transformers_common(func))


_mark_tests()
