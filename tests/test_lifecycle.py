"""The adapter lifecycle's plain parts, without a server: which paths the admin API may load, versioned names, the
state file a restart comes back from, in-flight counting for draining, shadow statistics, and the admin CLI's
requests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lora_router.deployment import ConfigError, from_dict, load_config
from serving.adapters import AdapterError, AdapterInfo, adapter_fingerprint, versioned_name
from serving.admin import AdminArguments, admin_request
from serving.gateway.protocol import GatewayError, is_lora_route, named_model, parse_add_adapter, parse_candidate
from serving.lifecycle import (
    AdapterRecord,
    AdapterSet,
    DeploymentState,
    PathRefused,
    ServedNames,
    config_adapters,
    load_adapters,
    read_state,
    resolve_adapter_path,
    write_state,
)
from serving.shadow import REFUSED, LabelledScore, ShadowSampler, ShadowStats
from tests.conftest import EXPERTS, deployment
from training.random_adapter import make_random_adapter

# -------------------------------------------------------------------------------------------- path containment


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/checkpoints/a (an adapter folder), root/elsewhere/b, and symlinks across."""
    (tmp_path / "checkpoints" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere" / "b").mkdir(parents=True)
    (tmp_path / "checkpoints" / "escape").symlink_to(tmp_path / "elsewhere" / "b")
    (tmp_path / "elsewhere" / "into").symlink_to(tmp_path / "checkpoints" / "a")
    return tmp_path


@pytest.mark.parametrize("path, inside", [
    ("checkpoints/a", "checkpoints/a"),
    ("{root}/checkpoints/a", "checkpoints/a"),
    ("elsewhere/into", "checkpoints/a"),  # a link from outside to inside: the real folder is inside
    ("checkpoints/./a", "checkpoints/a"),
])
def test_paths_inside_an_adapter_folder_resolve_to_the_real_folder(tree, path, inside):
    got = resolve_adapter_path(path.format(root=tree), [tree / "checkpoints"], tree)
    assert got == (tree / inside).resolve()


@pytest.mark.parametrize("path, words", [
    ("checkpoints/../elsewhere/b", "'..'"),
    ("checkpoints/a/../../elsewhere/b", "'..'"),
    ("{root}/elsewhere/b", "not inside an adapter folder"),
    ("/etc", "not inside an adapter folder"),
    ("checkpoints/escape", "not inside an adapter folder"),  # a link from inside to outside
    ("checkpoints", "not inside an adapter folder"),  # the folder of adapters is no adapter
    ("", "empty"),
])
def test_paths_outside_the_adapter_folders_are_refused_with_a_reason(tree, path, words):
    with pytest.raises(PathRefused, match=words):
        resolve_adapter_path(path.format(root=tree), [tree / "checkpoints"], tree)


def test_a_refusal_names_the_resolved_path_and_the_allowed_folders(tree):
    with pytest.raises(PathRefused) as info:
        resolve_adapter_path("checkpoints/escape", [tree / "checkpoints"], tree)
    message = str(info.value)
    assert str((tree / "elsewhere" / "b").resolve()) in message and str((tree / "checkpoints").resolve()) in message
    assert "gateway.adapter_dirs" in message


# -------------------------------------------------------------------------------------------- versioned names


def _fake_adapter(folder: Path, weights: bytes = b"w", labels: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "lora_router_manifest.json").write_text(json.dumps({"labels": labels}))
    return folder


def test_a_version_is_its_files_wherever_they_lie(tmp_path):
    one = adapter_fingerprint(_fake_adapter(tmp_path / "one"))
    assert one == adapter_fingerprint(_fake_adapter(tmp_path / "copy"))
    assert one != adapter_fingerprint(_fake_adapter(tmp_path / "retrained", weights=b"w2"))
    assert one != adapter_fingerprint(_fake_adapter(tmp_path / "relabelled", labels=["calendar"]))
    assert len(one) == 12 and int(one, 16) >= 0


def test_vllm_serves_each_version_under_its_own_name():
    info = AdapterInfo("router", Path("/a"), 16, "0123456789ab")
    assert info.served_as == versioned_name("router", "0123456789ab") == "router@0123456789ab"


def test_served_names_map_public_names_and_count_requests_in_flight():
    names = ServedNames({"calendar": "calendar@v1", "router": "router@v1"})
    assert names.served("calendar") == "calendar@v1" and names.served("base") == "base"
    with names.hold("calendar") as served:
        assert served == "calendar@v1" and names.in_flight("calendar@v1") == 1
        names.withdraw("calendar")  # removed while a request still runs on it: it still counts
        assert names.served("calendar") == "calendar" and names.in_flight("calendar@v1") == 1
    assert names.in_flight("calendar@v1") == 0
    names.publish("router", "router@v2")
    assert names.served("router") == "router@v2"


def test_models_listing_shows_public_names_only():
    names = ServedNames({"calendar": "calendar@v1", "router": "router@v2"})
    cards = [{"id": "base"}, {"id": "calendar@v1", "root": "/a"}, {"id": "router@v2"}, {"id": "router@v1"},
             {"id": "chandra-ocr@v9"}]
    assert names.public_models(cards) == [{"id": "base"}, {"id": "calendar", "root": "/a"}, {"id": "router"}]


# -------------------------------------------------------------------------------------------------- state file


def _state(tmp_path) -> DeploymentState:
    record = AdapterRecord
    return DeploymentState(config_adapters=["router=/c/router", "calendar=/c/calendar"],
                           router=record("router", str(tmp_path / "r4"), "aaaa", ""),
                           previous_router=record("router", str(tmp_path / "r3"), "bbbb"),
                           experts=[record("calendar", "/c/calendar", "cccc", "Click the day."),
                                    record("chandra-ocr", str(tmp_path / "ocr"), "dddd", "Transcribe.")])


def test_state_file_round_trip(tmp_path):
    path = tmp_path / "deploy.state.json"
    assert read_state(path) is None
    write_state(path, _state(tmp_path))
    assert read_state(path) == _state(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["deploy.state.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_state_file(tmp_path, monkeypatch):
    path = tmp_path / "deploy.state.json"
    write_state(path, _state(tmp_path))
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_state(path, DeploymentState(config_adapters=[], router=None, previous_router=None, experts=[]))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["deploy.state.json"]


@pytest.mark.parametrize("text, words", [
    ("{not json", "cannot be read"),
    ('{"config_adapters": [], "router": null, "previous_router": null, "experts": "x"}', "state.experts"),
    ('{"config_adapters": [], "router": null, "previous_router": null}', "missing required key(s): experts"),
])
def test_a_broken_state_file_is_named_with_what_to_do(tmp_path, text, words):
    path = tmp_path / "deploy.state.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_state(path)
    assert str(path) in str(info.value) and words in str(info.value) and "delete it" in str(info.value)


def test_the_state_file_lives_next_to_the_config(tmp_path):
    config_file = tmp_path / "configs" / "prod.yaml"
    config_file.parent.mkdir()
    config_file.write_text("experts: []\n")
    assert load_config(config_file).state_path == tmp_path / "configs" / "prod.state.json"
    assert load_config(config_file, ["gateway.state_file=state/s.json"]).state_path == \
        tmp_path / "configs" / "state" / "s.json"
    assert from_dict({}).state_path is None  # no file, no state_file: nothing persists


@pytest.fixture(scope="module")
def router4(tmp_path_factory, tiny_model_dir) -> Path:
    """A random router whose labels add chandra-ocr, and that expert, on the tiny model."""
    root = tmp_path_factory.mktemp("four")
    make_random_adapter(str(tiny_model_dir), root / "router4", labels=[*EXPERTS, "chandra-ocr"], seed=11)
    make_random_adapter(str(tiny_model_dir), root / "chandra-ocr", seed=12)
    return root


def _left_by_the_admin_api(config, adapters_dir, router4) -> AdapterSet:
    """What the admin API leaves after adding chandra-ocr and promoting the 4-class router."""
    _, start = load_adapters(config, None)
    ocr = AdapterInfo("chandra-ocr", router4 / "chandra-ocr", 8, adapter_fingerprint(router4 / "chandra-ocr"),
                      prompt="Transcribe.")
    new = AdapterInfo("router", router4 / "router4", 8, adapter_fingerprint(router4 / "router4"),
                      labels=(*EXPERTS, "chandra-ocr"))
    return AdapterSet(router=new, experts=start.experts + (ocr,), previous_router=start.router)


def test_a_restart_serves_what_the_admin_api_left(adapters_dir, router4, tmp_path, tiny_model_dir):
    config = deployment(adapters_dir, gateway={"state_file": str(tmp_path / "s.json")})
    left = _left_by_the_admin_api(config, adapters_dir, router4)
    write_state(config.state_path, left.state(config_adapters(config)))
    served, adapters = load_adapters(config, str(tiny_model_dir))
    assert adapters == left
    assert served.router.path == str(router4 / "router4") and served.labels == [*EXPERTS, "chandra-ocr"]
    assert served.experts[-1].prompt == "Transcribe."


def test_a_restart_keeps_a_previous_router_whose_expert_was_removed_since(adapters_dir, router4, tmp_path,
                                                                         tiny_model_dir):
    config = deployment(adapters_dir, gateway={"state_file": str(tmp_path / "s.json")})
    promoted = _left_by_the_admin_api(config, adapters_dir, router4)
    # Rolled back to the 3-class router, then chandra-ocr removed: the previous router names a missing expert.
    left = AdapterSet(router=promoted.previous_router, experts=promoted.experts[:-1], previous_router=promoted.router)
    write_state(config.state_path, left.state(config_adapters(config)))
    assert load_adapters(config, str(tiny_model_dir))[1] == left


def test_a_restart_refuses_a_state_file_that_no_longer_fits(adapters_dir, router4, tmp_path, tiny_model_dir):
    config = deployment(adapters_dir, gateway={"state_file": str(tmp_path / "s.json")})
    write_state(config.state_path, _left_by_the_admin_api(config, adapters_dir, router4).state(config_adapters(config)))
    edited = deployment(adapters_dir, experts=[], gateway={"state_file": str(tmp_path / "s.json")}, router=None)
    with pytest.raises(ConfigError, match="delete the state file to serve the config's adapters"):
        load_adapters(edited, str(tiny_model_dir))
    changed = tmp_path / "changed"
    shutil.copytree(router4, changed)
    state = read_state(config.state_path)
    state.router.path = str(changed / "router4")
    make_random_adapter(str(tiny_model_dir), changed / "router4", labels=[*EXPERTS, "chandra-ocr"], seed=99)
    write_state(config.state_path, state)
    with pytest.raises(AdapterError, match=r"router: the adapter at .* changed since"):
        load_adapters(config, str(tiny_model_dir))


# ----------------------------------------------------------------------------------------------------- shadow


@pytest.mark.parametrize("fraction, taken", [(1.0, 100), (0.25, 25), (0.1, 10), (0.0, 0), (0.3, 30)])
def test_the_sampler_takes_exactly_its_fraction(fraction, taken):
    sampler = ShadowSampler(fraction)
    assert sum(sampler.take() for _ in range(100)) == taken


def test_shadow_statistics_report_agreement_confusion_and_confidence():
    stats = ShadowStats(candidate="router@v2")
    for live, shadow, confidence in [("calendar", "calendar", 0.97), ("calendar", "calendar", 0.999),
                                     ("claim-window", "chandra-ocr", 0.62), ("claim-window", REFUSED, 0.05)]:
        stats.record(live, shadow, confidence)
    stats.failed += 1
    report = stats.report()
    assert report["candidate"] == "router@v2" and report["compared"] == 4 and report["agreed"] == 2
    assert report["agreement"] == 0.5 and report["failed"] == 1
    assert report["confusion"] == {"calendar": {"calendar": 2},
                                   "claim-window": {"chandra-ocr": 1, REFUSED: 1}}
    counts = dict(zip(report["confidence"]["buckets"], report["confidence"]["counts"]))
    assert counts[0.1] == 1 and counts[0.7] == 1 and counts[0.99] == 1 and counts[1.0] == 1
    assert sum(counts.values()) == 4 and report["confidence"]["mean"] == pytest.approx(0.65975, abs=1e-4)
    assert ShadowStats(candidate="x").report()["agreement"] is None
    assert report["labelled"] is None  # capture off: nothing labelled to score on


def test_labelled_scores_count_each_router_s_right_routes():
    score = LabelledScore(count=4)
    for label, live, candidate in [("calendar", "calendar", "calendar"), ("chandra-ocr", "calendar", "chandra-ocr"),
                                   ("claim-window", "claim-window", REFUSED)]:
        score.record(label, live, candidate)
    score.failed += 1
    assert score.report() == {"count": 4, "scored": 3, "failed": 1, "live": {"correct": 2, "accuracy": 0.6667},
                              "candidate": {"correct": 2, "accuracy": 0.6667}}
    assert LabelledScore(count=0).report()["live"]["accuracy"] is None


# --------------------------------------------------------------------------------------------------- settings


def test_the_admin_key_is_off_by_default_read_from_the_environment_and_never_the_service_key(monkeypatch):
    monkeypatch.delenv("LORA_ROUTER_ADMIN_KEY", raising=False)
    assert not from_dict({}).gateway.admin_enabled
    monkeypatch.setenv("LORA_ROUTER_ADMIN_KEY", "from-env")
    assert from_dict({}).gateway.admin_api_key == "from-env"
    with pytest.raises(ConfigError, match="admin_api_key must differ from engine.api_key"):
        from_dict({"engine": {"api_key": "same"}, "gateway": {"admin_api_key": "same"}})


@pytest.mark.parametrize("section, words", [
    ({"gateway": {"shadow_fraction": 1.5}}, "gateway.shadow_fraction must be in [0, 1]"),
    ({"gateway": {"drain_timeout_s": 0}}, "gateway.drain_timeout_s must be > 0"),
    ({"engine": {"lora_headroom": -1}}, "engine.lora_headroom must be >= 0"),
    ({"gateway": {"adapter_dirs": "checkpoints"}}, "gateway.adapter_dirs must be a list"),
    ({"source": "x.yaml"}, "source is no setting"),
])
def test_bad_lifecycle_settings_are_named(section, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        from_dict(section)


def test_adapter_folders_resolve_against_the_project_root(tmp_path):
    config = from_dict({"gateway": {"adapter_dirs": ["checkpoints", "/srv/adapters"]}}, root=tmp_path)
    assert config.adapter_dirs == [tmp_path / "checkpoints", Path("/srv/adapters")]


# -------------------------------------------------------------------------------------------------- wire, CLI


@pytest.mark.parametrize("body, words", [
    ({"path": "p"}, "'name' is missing"),
    ({"name": "x", "path": 3}, "'path' must be a string"),
    ({"name": "x", "path": "p", "rank": 8}, "unknown field(s) rank"),
])
def test_bad_admin_bodies_name_the_field(body, words):
    with pytest.raises(GatewayError) as info:
        parse_add_adapter(body)
    assert info.value.status == 400 and words in info.value.message
    assert parse_add_adapter({"name": "x", "path": "p"}).prompt == ""
    assert parse_candidate({"path": "checkpoints/r4"}) == "checkpoints/r4"


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "//v1/load_lora_adapter", "/v1/./unload_lora_adapter",
                                  "/v1/x/../load_lora_adapter", "/adapters", "/adapters/calendar"])
def test_vllms_own_adapter_loading_is_never_forwarded(path):
    assert is_lora_route(path)


def test_other_paths_are_forwarded_with_their_model_named():
    assert not is_lora_route("/tokenize") and not is_lora_route("/v1/adapters_list")
    assert named_model(b'{"model": "router", "prompt": "x"}') == ({"model": "router", "prompt": "x"}, "router")
    assert named_model(b"") is None and named_model(b"[1]") is None and named_model(b'{"model": 3}') is None


def test_the_cli_sends_each_action_to_its_route_with_the_admin_key(tmp_path):
    config = from_dict({"engine": {"port": 8123}, "gateway": {"admin_api_key": "adm"}})
    add = admin_request(AdminArguments(action="add-adapter", name="chandra-ocr", path="checkpoints/ocr"), config)
    assert (add.get_method(), add.full_url) == ("POST", "http://127.0.0.1:8123/admin/adapters")
    assert json.loads(add.data) == {"name": "chandra-ocr", "path": "checkpoints/ocr"}
    assert add.get_header("Authorization") == "Bearer adm"
    remove = admin_request(AdminArguments(action="remove-adapter", name="chandra-ocr"), config)
    assert (remove.get_method(), remove.full_url) == ("DELETE", "http://127.0.0.1:8123/admin/adapters/chandra-ocr")
    promote = admin_request(AdminArguments(action="promote", url="http://gw:9/"), config)
    assert (promote.get_method(), promote.full_url, promote.data) == ("POST", "http://gw:9/admin/router/promote",
                                                                      b"{}")
    with pytest.raises(ConfigError, match="candidate needs --path"):
        AdminArguments(action="candidate")
    with pytest.raises(ConfigError, match="no admin key"):
        admin_request(AdminArguments(action="state"), from_dict({}))
