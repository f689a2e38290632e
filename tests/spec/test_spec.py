from pathlib import Path

import pytest

from batchgen.errors import SpecError
from batchgen.spec.load import apply_overrides, load_spec, parse_spec

GOOD = """
input:
  path: s3://bucket/prompts/*.parquet
  prompt_column: text
model:
  path: Qwen/Qwen2.5-0.5B-Instruct
generation:
  max_new_tokens: 64
  temperature: 0.7
  n: 2
  stop: ["\\n\\n"]
output:
  path: s3://bucket/out
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text), overrides)
    return str(e.value)


def test_good_spec_loads_with_defaults(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.input.prompt_column == "text"
    assert spec.generation.n == 2 and spec.generation.stop == ("\n\n",)
    assert spec.resources.replicas == 1 and spec.resources.max_attempts == 3
    assert spec.model.truncation == "left" and spec.output.compression == "zstd"


def test_prompt_column_defaults_to_prompt(tmp_path):
    spec = load_spec(write(tmp_path, "input: {path: x}\nmodel: {path: m}\noutput: {path: o}\n"))
    assert spec.input.prompt_source == "prompt"


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("temperature:", "temprature:"))
    assert msg.startswith(f"{tmp_path / 'job.yaml'}: generation.temprature: unknown key (allowed: ")
    assert "temperature" in msg


def test_unknown_section(tmp_path):
    msg = error_of(tmp_path, GOOD + "extras: {a: 1}\n")
    assert "extras: unknown key" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, GOOD + "resources: {replicas: two}\n")
    assert "job.yaml: resources.replicas: Input should be a valid integer" in msg
    assert "got 'two'" in msg


def test_out_of_range(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("temperature: 0.7", "temperature: 0.7\n  top_p: 1.5"))
    assert msg.endswith("job.yaml: generation.top_p: Input should be less than or equal to 1, got 1.5")


def test_missing_required_key(tmp_path):
    msg = error_of(tmp_path, "input: {prompt_column: p}\nmodel: {path: m}\noutput: {path: o}\n")
    assert "job.yaml: input.path: required key is missing" in msg


def test_cross_field_rules(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("temperature: 0.7", "temperature: 0"))
    assert "generation: n > 1 needs temperature > 0" in msg
    msg = error_of(tmp_path, GOOD.replace("prompt_column: text", "prompt_column: text\n  template: 'x {{a}}'"))
    assert "input: give either prompt_column or template" in msg
    msg = error_of(tmp_path, GOOD.replace("prompt_column: text", "prompt_column: text\n  columns: [generation]"))
    assert "clash with output columns" in msg


def test_not_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "input: [unclosed")
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "nope.yaml")


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, GOOD)
    spec = load_spec(path, ["generation.temperature=0.2", "resources.replicas=4",
                            "generation.stop=['END', '###']", "output.path=/tmp/x"])
    assert spec.generation.temperature == 0.2 and spec.resources.replicas == 4
    assert spec.generation.stop == ("END", "###") and spec.output.path == "/tmp/x"
    assert "resources.replicas: Input should be greater than or equal to 1, got 0" in error_of(
        tmp_path, GOOD, ["resources.replicas=0"])
    with pytest.raises(SpecError, match="expected section.key=value"):
        load_spec(path, ["generation.temperature"])


def test_apply_overrides_does_not_mutate():
    raw = {"generation": {"n": 1}}
    assert apply_overrides(raw, ["generation.n=3"]) == {"generation": {"n": 3}}
    assert raw == {"generation": {"n": 1}}


def test_parse_spec_rejects_non_mapping():
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_spec(["a"], "x.yaml")



def test_duplicate_keys_are_refused_but_merge_keys_may_be_overridden(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("n: 2", "n: 2\n  n: 3"))
    assert msg == f"{tmp_path / 'job.yaml'}: line 11: duplicate key 'n'"
    # `<<: *anchor` followed by one of its keys is YAML's override, not a repeat.
    spec = load_spec(write(tmp_path, "model: &m {path: m}\ninput: {<<: *m, path: in.parquet}\n"
                                     "output: {path: o}\n"))
    assert spec.input.path == "in.parquet" and spec.model.path == "m"


def test_alias_bomb_in_a_set_value_is_refused():
    bomb = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]) + "]"
    with pytest.raises(SpecError, match=r"--set 'name=.*more than 100000 YAML nodes"):
        apply_overrides({}, [f"name={bomb}"])


def test_yaml_errors_are_one_line(tmp_path):
    msg = error_of(tmp_path, "input:\n  path: [a\nmodel: {path: m}\n")
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'job.yaml'}: not valid YAML: line 3")


def test_a_kms_key_id_is_no_credential(tmp_path):
    # Server-side encryption names its key with "Key" in the option; it is an id, not a secret.
    opts = "storage: {options: {s3_additional_kwargs: {ServerSideEncryption: 'aws:kms', SSEKMSKeyId: k1}}}\n"
    spec = load_spec(write(tmp_path, GOOD + opts))
    assert spec.storage.options["s3_additional_kwargs"]["SSEKMSKeyId"] == "k1"
    msg = error_of(tmp_path, GOOD + "storage: {options: {profile: p, token: t}}\n")
    assert "(storage.options.token)" in msg and "profile" not in msg.split(";")[0]


def test_encryption_settings_are_no_credentials(tmp_path):
    """Real S3 options whose names hold "key": a bucket-key switch, a customer key's checksum."""
    opts = ("storage: {options: {s3_additional_kwargs: {ServerSideEncryption: 'aws:kms', "
            "BucketKeyEnabled: true, SSECustomerKeyMD5: abc}}}\n")
    spec = load_spec(write(tmp_path, GOOD + opts))
    assert spec.storage.options["s3_additional_kwargs"]["BucketKeyEnabled"] is True
    msg = error_of(tmp_path, GOOD + "storage: {options: {s3_additional_kwargs: "
                   "{SSECustomerKey: secret}}}\n")
    assert "storage.options.s3_additional_kwargs.SSECustomerKey" in msg


@pytest.mark.parametrize("value, k", [("false", None), ("no", None), ("true", 0), ("0", 0),
                                      ("5", 5)])
def test_logprobs_false_is_off_and_true_is_the_chosen_token_only(tmp_path, value, k):
    # `logprobs: false` was read as K = 0 and turned logprobs on.
    spec = load_spec(write(tmp_path, GOOD), [f"generation.logprobs={value}"])
    assert spec.generation.logprobs == k
    assert ("logprobs" in spec.optional_columns()) == (k is not None)


@pytest.mark.parametrize("key", ["generation.n", "generation.max_new_tokens", "generation.top_k",
                                 "generation.temperature", "resources.replicas",
                                 "resources.gpus_per_replica"])
def test_a_yaml_boolean_is_not_a_number(tmp_path, key):
    message = error_of(tmp_path, GOOD, [f"{key}=yes"])
    assert f"{key}: expected a number, not a YAML boolean" in message


def test_booleans_where_text_is_meant_say_to_quote_them(tmp_path):
    message = error_of(tmp_path, GOOD, ["generation.stop=[on, '###']"])
    assert ("generation.stop: item 1 is a YAML boolean (an unquoted yes/no/on/off/true/false), "
            "not text; quote each item") in message
    assert load_spec(write(tmp_path, GOOD), ["generation.stop=['on', '###']"]).generation.stop \
        == ("on", "###")
