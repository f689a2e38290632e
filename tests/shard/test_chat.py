"""Chat: conversations from a messages column, tools and template kwargs in the chat template,
bad conversations as error rows, and reading reasoning and tool calls out of generations."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest
from conftest import spec_dict

from batchgen.errors import SpecError
from batchgen.shard import prompts
from batchgen.shard.responses import parse_tool_calls, split_reasoning
from batchgen.shard.rows import row_dicts
from batchgen.spec.load import parse_spec

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                   "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}

# The tiny model's chat template before it learned tools: prompts without tools must not change.
OLD_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def job(**input_values):
    raw = spec_dict("in", "out", "m", input={"prompt_column": None, "columns": ["id"],
                                             **input_values})
    return parse_spec(raw)


def messages_job(**input_values):
    return job(messages_column="messages", **input_values)


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from batchgen.engine.loading import load_tokenizer
    from batchgen.spec import ModelSpec

    return load_tokenizer(ModelSpec(path=tiny_model))


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def prompt_of(spec, tokenizer, messages):
    texts, errors = prompts.render_prompts(spec, [{"id": "r0", "messages": messages}], {},
                                           tokenizer)
    assert errors == [None]
    return texts[0]


# -- rendering a messages row ---------------------------------------------------------------


def test_a_conversation_is_rendered_with_the_chat_template_and_answered_next(tokenizer):
    spec = messages_job()
    assert spec.input.chat  # messages_column implies chat
    turns = [user("Hi"), {"role": "assistant", "content": "Hello."}, user("Tea?")]
    assert prompt_of(spec, tokenizer, turns) == (
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nTea?<|end|>\n<|assistant|>\n")


def test_the_system_prompt_goes_first_unless_the_row_has_its_own(tokenizer):
    spec = messages_job(system_prompt="Be brief.",
                        examples=[{"user": "1+1?", "assistant": "2"}])
    assert prompt_of(spec, tokenizer, [user("Tea?")]) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n1+1?<|end|>\n<|assistant|>\n2<|end|>\n"
        "<|user|>\nTea?<|end|>\n<|assistant|>\n")
    own = [{"role": "system", "content": "Talk like a pirate."}, user("Tea?")]
    assert prompt_of(spec, tokenizer, own) == (
        "<|system|>\nTalk like a pirate.<|end|>\n<|user|>\n1+1?<|end|>\n<|assistant|>\n2<|end|>\n"
        "<|user|>\nTea?<|end|>\n<|assistant|>\n")


def test_tools_are_shown_to_the_model_and_tool_turns_are_rendered(tokenizer):
    spec = messages_job(tools=[WEATHER, CLOCK])
    turns = [user("Weather in Paris?"),
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather",
                                                   "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": "c1"}]
    text = prompt_of(spec, tokenizer, turns)
    assert text.startswith("<|system|>\nYou can call these tools. Answer with <tool_call>")
    assert "\nget_weather(city, days): Weather in a city.\nget_time(): \n<|end|>" in text
    assert ('<|assistant|>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '</tool_call><|end|>\n<|tool|>\n{"sky": "clear"}<|end|>\n<|assistant|>\n') in text


def test_tools_reach_the_chat_template_of_a_plain_chat_job_too(tokenizer):
    spec = job(prompt_column="prompt", chat=True, tools=[WEATHER])
    [text], [error] = prompts.render_prompts(spec, [{"prompt": "Weather?"}], {}, tokenizer)
    assert error is None and "get_weather(city, days)" in text
    assert text.endswith("<|user|>\nWeather?<|end|>\n<|assistant|>\n")


def test_chat_template_kwargs_reach_the_template(tokenizer):
    tok = with_template(tokenizer, "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                   "{% if enable_thinking %}<think>{% else %}<answer>{% endif %}")
    on = messages_job(chat_template_kwargs={"enable_thinking": True})
    off = messages_job(chat_template_kwargs={"enable_thinking": False})
    assert prompt_of(on, tok, [user("Hi")]) == "Hi<think>"
    assert prompt_of(off, tok, [user("Hi")]) == "Hi<answer>"


def test_the_plans_tokenizer_renders_tools_and_kwargs_as_the_replicas_do(tiny_model, tokenizer):
    from batchgen.io.modelcheck import light_tokenizer
    from batchgen.spec import ModelSpec

    light = light_tokenizer(ModelSpec(path=tiny_model))
    spec = messages_job(tools=[WEATHER], chat_template_kwargs={"enable_thinking": True},
                        system_prompt="Be brief.")
    rows = [{"messages": [user("Weather?"), {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "rain"}]}]
    assert prompts.render_prompts(spec, rows, {}, light) == prompts.render_prompts(
        spec, rows, {}, tokenizer)


def test_chat_prompts_without_tools_are_unchanged(tokenizer):
    """The tiny model's template gained tools; jobs without them keep their prompts byte for
    byte, and the call to apply_chat_template is the one it always was."""
    old = with_template(tokenizer, OLD_TEMPLATE)
    for spec, row in [
        (job(prompt_column="prompt", chat=True), {"prompt": "Write one sentence."}),
        (job(prompt_column="prompt", chat=True, system_prompt="Be brief.",
             examples=[{"user": "Q?", "assistant": "A."}]), {"prompt": "Tea?"}),
        (messages_job(system_prompt="Be brief."),
         {"messages": [user("Hi"), {"role": "assistant", "content": "Yo"}, user("Tea?")]}),
    ]:
        assert prompts.render_prompts(spec, [row], {}, tokenizer) == prompts.render_prompts(
            spec, [row], {}, old)

    calls = []

    class Spy:
        def apply_chat_template(self, *args, **kwargs):
            calls.append((args, kwargs))
            return "x"

    prompts.wrap_prompt(job(prompt_column="prompt", chat=True), "Hi", Spy())
    assert calls == [(([user("Hi")],), {"tokenize": False, "add_generation_prompt": True})]


def test_a_template_that_fails_on_a_row_fails_that_row_only(tokenizer):
    tok = with_template(tokenizer, "{% for m in messages %}{% if m['role'] == 'tool' %}"
                                   "{{ raise_exception('tool turns are not supported') }}"
                                   "{% endif %}{{ m['content'] }}{% endfor %}")
    spec = messages_job()
    rows = [{"messages": [user("a"), {"role": "assistant", "content": "b"},
                          {"role": "tool", "content": "c"}]},
            {"messages": [user("fine")]}]
    texts, errors = prompts.render_prompts(spec, rows, {}, tok)
    assert errors == ["chat template error: tool turns are not supported", None]
    assert texts == [None, "fine"]


@pytest.mark.parametrize("value, message", [
    (None, "messages column 'messages' is null"),
    ("Hi there", "messages column 'messages' holds str, not a list of messages"),
    ([], "messages column 'messages' is an empty list; nothing to answer"),
    (["Hi"], "messages column 'messages': message 1 is str, not a mapping with role and content"),
    ([user("a"), {"content": "b"}], "messages column 'messages': message 2 has no role"),
    ([{"role": "human", "content": "b"}],
     ("messages column 'messages': message 1 has role 'human'; roles are system, user, "
      "assistant, tool")),
    ([{"role": "user", "content": 42}],
     "messages column 'messages': message 1 (user) has content of type int, not text"),
    ([{"role": "user", "content": None}], "messages column 'messages': message 1 (user) has no content"),
    ([{"role": "user"}], "messages column 'messages': message 1 (user) has no content"),
    ([user("Hi"), {"role": "assistant", "content": "Hello."}],
     "messages column 'messages' ends with an assistant message; nothing to answer"),
    ([{"role": "system", "content": "Be brief."}],
     "messages column 'messages' ends with a system message; nothing to answer"),
])
def test_a_bad_conversation_is_an_error_row_that_says_what_is_wrong(tokenizer, value, message):
    rows = [{"id": "bad", "messages": value}, {"id": "ok", "messages": [user("Hi")]}]
    texts, errors = prompts.render_prompts(messages_job(), rows, {}, tokenizer)
    assert errors[0].startswith(message)
    assert texts[0] is None and errors[1] is None and texts[1].endswith("<|assistant|>\n")


def test_parquet_conversations_render_whatever_their_layout(tokenizer):
    """Structs give every message every field (null where it had none) and maps come out of
    pyarrow as key/value pairs: both render as the plain messages would."""
    call = pa.struct([("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    struct = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()),
                                 ("tool_calls", pa.list_(call)), ("name", pa.string())]))
    table = pa.table({
        "messages": pa.array([
            [{"role": "user", "content": "Hi"}],
            [{"role": "user", "content": "Rain?"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
             {"role": "tool", "content": "yes", "name": "get_weather"}],
        ], struct),
        "as_map": pa.array([[[("role", "user"), ("content", "Hi")]]] * 2,
                           pa.list_(pa.map_(pa.string(), pa.string()))),
    })
    rows, bad = row_dicts(table)
    spec = messages_job(tools=[WEATHER])
    texts, errors = prompts.render_prompts(spec, rows, bad, tokenizer)
    assert errors == [None, None]
    assert texts[0] == prompt_of(spec, tokenizer, [user("Hi")])
    assert ('<|assistant|>\n<tool_call>{"name": "get_weather", "arguments": {"city":"Oslo"}}'
            '</tool_call><|end|>\n<|tool|>\nyes<|end|>\n') in texts[1]
    assert "None" not in texts[1]
    map_spec = job(messages_column="as_map")
    assert prompts.render_prompts(map_spec, rows, bad, tokenizer)[0] == [
        prompt_of(messages_job(), tokenizer, [user("Hi")])] * 2


def test_the_job_prefix_of_a_messages_job_holds_the_system_prompt_and_tools(tokenizer):
    spec = messages_job(system_prompt="Be brief.", tools=[WEATHER])
    a, b = prompts.prefix_probes(spec, tokenizer)
    assert a != b
    shared = a[:next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
    assert shared.startswith("<|system|>\nYou can call these tools.")
    assert shared.endswith("<|system|>\nBe brief.<|end|>\n<|user|>\n")


def test_a_messages_job_reads_its_messages_column():
    spec = messages_job(id_column="id")
    assert prompts.needed_columns(spec.input) == ["messages", "id"]


# -- column types at plan time ----------------------------------------------------------------


def schema(kind) -> pa.Schema:
    return pa.schema([pa.field("id", pa.string()), pa.field("messages", kind)])


MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


@pytest.mark.parametrize("kind, problem", [
    (pa.string(), "not a list"),
    (MESSAGE, "not a list"),
    (pa.list_(pa.string()), "a list of string, not of messages"),
    (pa.list_(pa.struct([("content", pa.string())])), "whose messages have no role field"),
    (pa.list_(pa.struct([("role", pa.string()), ("text", pa.string())])),
     "whose messages have no content field"),
    (pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(pa.string()))])),
     "whose message content is of type list<item: string>, not text"),
])
def test_a_messages_column_that_cannot_hold_conversations_is_refused_at_plan_time(kind, problem):
    with pytest.raises(SpecError) as e:
        prompts.check_column_types(messages_job().input, schema(kind), "in/part-0.parquet")
    assert str(e.value).startswith(
        f"in/part-0.parquet: input.messages_column 'messages' is of type {kind}, {problem}, so "
        "every row would be an error row")
    assert "list<struct<role: string, content: string>>" in str(e.value)


@pytest.mark.parametrize("kind", [
    pa.list_(MESSAGE), pa.large_list(MESSAGE), pa.list_(pa.map_(pa.string(), pa.string())),
    pa.list_(pa.struct([("role", pa.string()), ("content", pa.large_string()),
                        ("name", pa.string())])),
    pa.null(),
])
def test_message_lists_pass_the_plan_time_check(kind):
    prompts.check_column_types(messages_job().input, schema(kind), "f.parquet")


# -- reasoning --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("<think>\nThe user wants tea.\n</think>\n\nHere is tea.", ("The user wants tea.", "Here is tea.")),
    ("The user wants tea.</think>Here is tea.", ("The user wants tea.", "Here is tea.")),  # <think> in the prompt
    ("<think></think>Tea.", ("", "Tea.")),
    ("<think>a</think>b</think>c", ("a", "b</think>c")),  # the first end marker ends it
    ("<think>\nStill thinking about", ("Still thinking about", "")),  # cut off: all reasoning
    ("", ("", "")),
])
def test_reasoning_is_the_text_before_the_end_marker(text, expected):
    assert split_reasoning(text, "</think>") == expected


def test_reasoning_markers_that_are_not_tags():
    assert split_reasoning("[THINK]hm[/THINK] ok", "[/THINK]") == ("[THINK]hm", "ok")
    assert split_reasoning("[THINK]hm[/THINK] ok", "[/THINK]", "[THINK]") == ("hm", "ok")


def test_a_prompt_that_closed_the_thinking_leaves_no_reasoning():
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert split_reasoning("  Tea.", "</think>", prompt=closed) == (None, "Tea.")
    assert split_reasoning("hm</think>Tea.", "</think>", prompt="<think>\n") == ("hm", "Tea.")


# -- tool calls -------------------------------------------------------------------------------


def test_tool_call_blocks_are_read_with_canonical_arguments():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"days": 2, '
            '"city": "Zürich"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": '
            '"{}"}</tool_call>')
    assert parse_tool_calls(text, (WEATHER, {"type": "function", "function": CLOCK})) == ([
        {"name": "get_weather", "arguments": '{"city":"Zürich","days":2}'},
        {"name": "get_time", "arguments": "{}"}], None)


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
    '  {"arguments": "{\\"city\\": \\"Oslo\\"}", "name": "get_weather"}\n',  # arguments as a JSON string
    '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3's spelling
    ('<tool_call>{"type": "function", "function": {"name": "get_weather", '
     '"arguments": {"city": "Oslo"}}}</tool_call>'),
])
def test_a_generation_that_is_one_call_is_read(text):
    assert parse_tool_calls(text, (WEATHER,)) == (
        [{"name": "get_weather", "arguments": '{"city":"Oslo"}'}], None)


@pytest.mark.parametrize("text", ["It is sunny in Oslo.", '{"city": "Oslo"}', "{not json", ""])
def test_a_plain_answer_has_no_calls_and_no_error(text):
    assert parse_tool_calls(text, (WEATHER,)) == ([], None)


@pytest.mark.parametrize("text, error", [
    ("<tool_call>{'name': 'get_weather'}</tool_call>",
     "tool call 1: invalid JSON: Expecting property name enclosed in double quotes at char 1"),
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_w',
     "tool call 2: <tool_call> without </tool_call> (cut off by max_new_tokens?)"),
    ('<tool_call>["get_weather"]</tool_call>',
     "tool call 1: a JSON array, not an object with name and arguments"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'tool call 1: no "name"'),
    ('<tool_call>{"name": "get_weather"}</tool_call>', 'tool call 1 (get_weather): no "arguments"'),
    ('<tool_call>{"name": "get_weather", "arguments": "{city"}</tool_call>',
     "tool call 1 (get_weather): arguments: invalid JSON"),
    ('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
     "tool call 1 (get_weather): arguments are a JSON array, not an object"),
    (('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
      '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),
     "tool call 2 (rm_rf): unknown tool; the tools are get_time, get_weather"),
    ('{"name": "get_weather", "arguments": {"city": 7}}',
     ("tool call 1 (get_weather): arguments do not match the tool's parameters: city: 7 is "
      "not of type 'string'")),
    ('{"name": "get_weather", "arguments": {"days": 1}}',
     ("tool call 1 (get_weather): arguments do not match the tool's parameters: (root): "
      "'city' is a required property")),
])
def test_a_malformed_call_is_an_error_that_names_the_call(text, error):
    calls, message = parse_tool_calls(text, (WEATHER, {"type": "function", "function": CLOCK}))
    assert calls is None and message.startswith(error)


def test_without_tools_any_well_formed_call_is_taken():
    assert parse_tool_calls('{"name": "anything", "arguments": {"x": [1, 2]}}') == (
        [{"name": "anything", "arguments": '{"x":[1,2]}'}], None)


# transformers 5 reads a model's calls with the tokenizer's declarative `response_template`
# (tokenizer.parse_response); this one delimits calls with tags the JSON convention does not know.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>\n",
    "fields": {
        "tool_calls": {"open_pattern": r"\s*\[CALL\]", "close": "[/CALL]", "repeats": True,
                       "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*<\|end\|>", "content": "text"},
    },
}


def test_a_tokenizer_with_a_response_template_parses_the_calls(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.response_template = RESPONSE_TEMPLATE
    text = ('Checking.[CALL]{"name": "get_weather", "arguments": {"city": "Oslo", "days": "3"}}'
            '[/CALL]<|end|>')
    # The template's tools casting turns the string "3" into the integer the schema asks for.
    assert parse_tool_calls(text, (WEATHER,), tok, prefix="<|user|>\nHi<|end|>\n<|assistant|>\n") == (
        [{"name": "get_weather", "arguments": '{"city":"Oslo","days":3}'}], None)
    assert parse_tool_calls(text, (WEATHER,), tokenizer) == ([], None)  # no template: not a call
    # A template that finds no call leaves the JSON convention to try.
    assert parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', (WEATHER,),
                            tok)[0] == [{"name": "get_weather", "arguments": '{"city":"Oslo"}'}]
    calls, error = parse_tool_calls("[CALL]{oops[/CALL]", (WEATHER,), tok)
    assert calls is None
    assert error.startswith("tool calls: the tokenizer's response template cannot parse the text")
