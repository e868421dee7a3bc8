"""Presets (vas_server.presets): steering settings served as models, so that a client that can only
choose `model` can steer. The session's HTTP server (tests/http_server.py) has two configured
presets, PRESETS, and every head is a preset under its own name. The official `openai` client is
the client; langchain-openai's ChatOpenAI stands for the clients that cannot send extra fields.
"""

from __future__ import annotations

import pytest

from http_server import API_KEY, HEADS, PRESETS, PROMPT, ErrorResponse, check_shape
from vas_server import cli
from vas_server.presets import DEFAULT_HEAD_WEIGHT

MESSAGES = [{"role": "user", "content": "Hello, how are you"}]
# name -> the request fields it stands for (PRESETS' settings, as the server was started)
AS_FIELDS = {
    "cheerful": {"vas_weights": {"likes": 8.0}, "vas_top_k": 256, "vas_restrict_to_top_k": False},
    "mixed": {"vas_weights": {"t1": 2.0, "s1": -1.0}, "vas_top_k": 5, "vas_restrict_to_top_k": True},
    **{head: {"vas_weights": {head: DEFAULT_HEAD_WEIGHT}} for head in HEADS},
}


def _complete(client, model: str, **extra):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)


def test_every_listed_id_is_a_model_that_can_be_chosen(client, model):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {model, *HEADS, *PRESETS}
    for name in [*HEADS, *PRESETS]:
        card = client.models.retrieve(name)
        assert card.id == name and card.model_extra["parent"] == model == cards[name].model_extra["parent"]
        settings = card.model_extra["vas_preset"]
        assert settings["weights"] == AS_FIELDS[name]["vas_weights"]
        assert ("vas_head" in card.model_extra) == (name in HEADS)
        # chosen in completions, chat and streaming: answered under its own name, steered as listed
        done = _complete(client, name)
        assert done.model == name and done.model_extra["vas"]["weights"] == settings["weights"]
        assert done.model_extra["vas"]["top_k"] == settings["top_k"]
        chat = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6, temperature=0)
        assert chat.model == name and chat.model_extra["vas"]["weights"] == settings["weights"]
        chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6, temperature=0,
                                                     stream=True))
        assert chunks and all(c.model == name for c in chunks)
        assert chunks[-1].model_extra["vas"]["weights"] == settings["weights"]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert cards["likes"].model_extra["vas_head"]["value_model"] == "liker"


@pytest.mark.parametrize("name", ["cheerful", "mixed", "t1"])
def test_a_preset_is_the_base_with_its_fields(client, model, name):
    """Greedy: choosing the preset gives the text of the base with the preset's vas_* fields, and
    (at these weights) not the base's own text."""
    chosen = _complete(client, name)
    by_fields = _complete(client, model, **AS_FIELDS[name])
    plain = _complete(client, model)
    assert chosen.choices[0].text == by_fields.choices[0].text
    assert chosen.model_extra["vas"] == by_fields.model_extra["vas"]
    assert chosen.choices[0].text != plain.choices[0].text, "the preset did not steer"


def test_request_fields_override_the_preset_field_by_field(client, model):
    # vas_weights replaces the preset's weights as a whole; its top-K and restriction stay.
    own = _complete(client, "mixed", vas_weights={"t2": 1.5})
    assert own.model_extra["vas"] == {"weights": {"t2": 1.5}, "top_k": 5, "restrict_to_top_k": True}
    assert own.choices[0].text == _complete(client, model, vas_weights={"t2": 1.5}, vas_top_k=5,
                                            vas_restrict_to_top_k=True).choices[0].text
    # vas_top_k alone replaces the top-K, the weights stay the preset's.
    k = _complete(client, "cheerful", vas_top_k=3)
    assert k.model_extra["vas"] == {"weights": {"likes": 8.0}, "top_k": 3, "restrict_to_top_k": False}
    # empty weights: the base, unsteered
    off = _complete(client, "cheerful", vas_weights={})
    assert off.model_extra["vas"] is None and off.choices[0].text == _complete(client, model).choices[0].text


def test_unknown_model_is_a_404_listing_every_id(server):
    r = server.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES})
    assert r.status_code == 404, r.text
    error = check_shape(ErrorResponse, r.json()).error
    assert error.type == "NotFoundError" and error.param == "model"
    for name in ["tiny", *HEADS, *PRESETS]:
        assert name in error.message


def test_preset_requests_are_counted_in_metrics(server, client):
    before = server.metrics().get('vas_preset_requests_total{preset="cheerful"}', 0)
    _complete(client, "cheerful")
    assert server.metrics()['vas_preset_requests_total{preset="cheerful"}'] == before + 1


def test_langchain_chat_model_is_steered_by_choosing_a_preset(server, client, model):
    """A real third-party client that sends no extra fields: langchain-openai's ChatOpenAI."""
    from langchain_openai import ChatOpenAI

    def chat(name: str) -> str:
        llm = ChatOpenAI(model=name, base_url=f"{server.url}/v1", api_key=API_KEY, temperature=0, max_tokens=12)
        return llm.invoke("Hello, how are you").content

    steered = chat("cheerful")
    fields = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                            extra_body=AS_FIELDS["cheerful"]).choices[0].message.content
    assert steered == fields
    assert steered != chat(model)


# -- startup refusals (vas-server serve's argument handling, no engine) ---------------------------


def _configure(tiny_base, value_models, *argv):
    parser, serve = cli.build_parser()
    argv = (str(tiny_base), "--served-model-name", "tiny", "--value-model", f"liker={value_models['liker']}", *argv)
    return cli.configure(parser.parse_args(["serve", *argv]), serve.parse_args([]), cli.explicit_args(argv))


@pytest.mark.parametrize("preset, message", [
    ("happy=nope:2", "preset 'happy': vas_weights: unknown head 'nope'"),
    ("happy=likes:101", "preset 'happy': vas_weights.likes must be a number in -100..100"),
    ("happy=likes:2@K=0", "preset 'happy': vas_top_k must be an integer in 1..256"),
    ("tiny=likes:2", "preset 'tiny' has the name of a served model"),
    ("likes=likes:3", "preset 'likes' has the name of a head"),
    ("happy=likes", "preset 'happy': 'likes' is not HEAD:WEIGHT"),
])
def test_bad_presets_are_refused_at_startup(tiny_base, value_models, capsys, preset, message):
    """The message names the preset: argparse's (on stderr) for a malformed flag, ours otherwise."""
    with pytest.raises(SystemExit) as e:
        _configure(tiny_base, value_models, "--preset", preset)
    assert message in capsys.readouterr().err + str(e.value)


def test_a_preset_given_twice_is_refused(tiny_base, value_models):
    with pytest.raises(SystemExit, match="preset 'happy' is given twice"):
        _configure(tiny_base, value_models, "--preset", "happy=likes:1", "--preset", "happy=likes:2")


def test_presets_come_from_the_config_file_and_flags_win(tiny_base, value_models, tmp_path):
    """`--config FILE` (vLLM's YAML support: keys are the flags) holds presets, value models and vLLM
    flags alike; a flag given on the command line wins over the file."""
    config = tmp_path / "serve.yaml"
    config.write_text(f"value-model:\n  - liker={value_models['liker']}\n"
                      "preset:\n  - happy=likes:3\n  - calm=likes:-2@K=40\nmax-num-seqs: 7\ndefault-top-k: 9\n")
    parser, serve = cli.build_parser()
    argv = [str(tiny_base), "--config", str(config), "--default-top-k", "11"]
    args = parser.parse_args(["serve", *argv])
    vas = cli.configure(args, serve.parse_args([]), cli.explicit_args(argv))
    assert set(vas.presets) == {"happy", "calm"} and vas.presets["calm"]["top_k"] == 40
    assert args.max_num_seqs == 7 and vas.default_top_k == 11


def test_the_embedded_base_ships_presets_for_the_demo_heads():
    presets = dict(cli.demo_presets())
    assert {"cheerful", "brief", "plain-words"} <= set(presets)
    assert {h for p in presets.values() for h in p.weights} == {"positive", "concise", "simple"}



# -- presets and their cards as the request contract's models (no engine) -------------------------


def test_a_configured_preset_is_held_to_the_request_contract():
    from vas_server.presets import Preset, PresetTable

    table = PresetTable.build({"calm": {"weights": {"likes": -2, "t1": 0}, "top_k": 40}}, ["likes", "t1"], [])
    assert table.get("calm") == Preset({"likes": -2.0}, 40)  # zero weights dropped, as in a request
    assert PresetTable.build({"calm": table.get("calm").to_json()}, ["likes", "t1"], []).get("calm") == table.get("calm")
    for raw, message in [({"weights": {"likes": 1}, "topk": 3}, r"unknown VAS setting\(s\) \['topk'\]"),
                         ({"weights": {"likes": 1}, "top_k": "3"}, "vas_top_k must be an integer"),
                         ({"weights": {"likes": True}}, r"vas_weights\.likes must be a number")]:
        with pytest.raises(ValueError, match=f"preset 'calm': {message}"):
            PresetTable.build({"calm": raw}, ["likes"], [])


def test_preset_cards_are_openai_model_objects_with_the_settings_as_they_apply():
    from types import SimpleNamespace

    from vas_server.config import VASConfig
    from vas_server.http.model_cards import preset_card
    from vas_server.http.server_view import ServerView

    config = VASConfig(value_models=cli.demo_value_models(), presets={"calm": {"weights": {"positive": -1}}})
    state = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=config.to_additional_config()),
                            args=SimpleNamespace(api_key=None), engine_client=None,
                            openai_serving_models=SimpleNamespace(base_model_paths=[SimpleNamespace(name="base")],
                                                                  lora_requests={}))
    server = ServerView.of(state)
    card = preset_card("calm", server.presets.get("calm"), server, "base", 7)
    assert card == {"id": "calm", "object": "model", "created": 7, "owned_by": "vas-server", "root": "base",
                    "parent": "base", "max_model_len": None, "permission": [],
                    "vas_preset": {"weights": {"positive": -1.0}, "top_k": 256, "restrict_to_top_k": False}}
    head = preset_card("positive", server.presets.get("positive"), server, "base", 7)
    assert {k: v for k, v in head.items() if k != "vas_head"} == {
        **card, "id": "positive", "vas_preset": {"weights": {"positive": DEFAULT_HEAD_WEIGHT}, "top_k": 256,
                                                 "restrict_to_top_k": False}}
    assert set(head["vas_head"]) == {"value_model", "kind", "description", "trunk", "runtime", "reward_mean",
                                     "reward_std", "num_training_samples"}
    assert head["vas_head"]["trunk"]["type"] == "base_prefix" and head["vas_head"]["kind"] in ("state", "token")
