"""Interpretation: top examples and logit lens against brute force, offline HTML reports,
hinted AUROC scores and selection, and the LLM explainer against a local fake endpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from caft_tl import _http
from caft_tl.activations import cache_activations
from caft_tl.data import tokenize
from caft_tl.directions import ConceptSet, make_provenance
from caft_tl.directions import interpret as it
from caft_tl.directions.concepts import data_fingerprint

R1 = "blocks.1.hook_resid_post"
MLP0 = "blocks.0.mlp.hook_post"
TEXTS = [
    "The cat sat on the mat and looked at the door.",
    "He went to the store and bought milk, bread and eggs.",
    "She said hello to everyone\nin the room before leaving.",
    "Numbers like 12, 345 and 6789 appear here.",
    "A short one.",
]
MALE = ["He is a man.", "The king rode his horse.", "My father and his brother.", "Sir John."]
FEMALE = ["She is a woman.", "The queen rode her horse.", "My mother and her sister.", "Lady Jane."]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def concepts() -> ConceptSet:
    g = torch.Generator().manual_seed(0)
    return ConceptSet(
        {R1: torch.randn(3, 64, generator=g), MLP0: torch.randn(2, 128, generator=g)},
        labels={R1: ["PC0", "PC1", "PC2"]},
        scores={R1: [0.5, 0.3, 0.1]},
        provenance=make_provenance("test", model="tiny"),
    )


@pytest.fixture(scope="module")
def acts(model, concepts):
    return cache_activations(model, TEXTS, concepts.hooks, progress=False)


def _brute(model, texts, hook) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Token ids and [pos, width] activations of each text, one unpadded forward pass each."""
    ids = [list(x) for x in tokenize(texts, model.tokenizer)["input_ids"]]
    outs = []
    for row in ids:
        _, cache = model.run_with_cache(torch.tensor([row]), names_filter=[hook])
        outs.append(cache[hook][0].detach())
    return ids, outs


def _pairwise_auroc(pos, neg) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins) / (len(pos) * len(neg))


# ---- top examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_first", [True, False])
def test_top_examples_match_brute_force(model, concepts, acts, skip_first):
    k = 4
    df = it.top_examples(model, concepts, acts=acts, k=k, skip_first=skip_first)
    assert len(df) == concepts.n_directions * 2 * k
    for hook in concepts.hooks:
        ids, brute = _brute(model, TEXTS, hook)
        for index, d in enumerate(concepts[hook]):
            flat = [
                (float(h[p] @ d), e, p)
                for e, h in enumerate(brute)
                for p in range(len(h))
                if p > 0 or not skip_first
            ]
            for side, ordered in (("top", sorted(flat, reverse=True)), ("bottom", sorted(flat))):
                got = df[(df.hook == hook) & (df["index"] == index) & (df.side == side)]
                got = got.sort_values("rank")
                assert list(zip(got.example, got.position, strict=True)) == [
                    (e, p) for _, e, p in ordered[:k]
                ]
                assert got.value.tolist() == pytest.approx([v for v, _, _ in ordered[:k]], abs=1e-4)
                for row in got.itertuples():
                    assert row.token_id == ids[row.example][row.position]
                    assert f"[[{row.token}]]" in row.context.replace("↵", "\n")
                    assert row.label == concepts.labels[hook][index]
    if skip_first:
        assert (df.position > 0).all()


def test_top_examples_from_data_equals_from_acts(model, concepts, acts):
    a = it.top_examples(model, concepts, TEXTS, k=2)
    b = it.top_examples(model, concepts, acts=acts, k=2)
    assert a.drop(columns="value").equals(b.drop(columns="value"))
    assert a.value.tolist() == pytest.approx(b.value.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="lacks"):
        it.top_examples(model, concepts, acts=cache_activations(model, TEXTS, R1, progress=False))
    with pytest.raises(ValueError, match="pass data"):
        it.top_examples(model, concepts)


def _props(rendered) -> dict:
    # The CDN source is small and holds the same props as the self-contained one.
    return json.loads(re.search(r"ColoredTokens,\s*(\{.*\})\s*\)", rendered.cdn_src, re.S)[1])


def test_shaded_examples_values_are_projections(model, concepts):
    window = (3, 2)
    ids, brute = _brute(model, TEXTS, R1)
    d = concepts[R1][1]
    # A "last"-token cache lacks the window's neighbours: values come from a forward pass.
    for positions in ("all", "last"):
        acts = cache_activations(model, TEXTS, [R1], positions=positions, progress=False)
        table = it.top_examples(model, concepts.select({R1: [1]}), acts=acts, k=2, window=window)
        shaded = it.shaded_examples(model, concepts, R1, 1, acts=acts, k=2, window=window)
        assert len(shaded) == 2
        for rendered, row in zip(shaded, table[table.side == "top"].itertuples(), strict=True):
            props = _props(rendered)
            start = max(0, row.position - window[0])
            stop = min(len(ids[row.example]), row.position + window[1] + 1)
            expect = (brute[row.example][start:stop] @ d).tolist()
            assert props["values"] == pytest.approx(expect, abs=1e-4)
            assert len(props["tokens"]) == stop - start
            assert props["maxValue"] == -props["minValue"] > 0
    with pytest.raises(IndexError):
        it.shaded_examples(model, concepts, R1, 7, acts=acts)


# ---- logit lens -------------------------------------------------------------------------------


def test_logit_lens_matches_manual_unembedding(tokenizer, concepts):
    from caft_tl.models import tiny

    model = tiny(tokenizer=tokenizer, seed=1)
    with torch.no_grad():  # initialised to ones: make the final norm's weight matter
        model.ln_final.w.copy_(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.1)
    k = 5
    df = it.logit_lens(model, concepts, k=k)
    w, W_U = model.ln_final.w.detach(), model.W_U.detach()
    resid = {R1: concepts[R1], MLP0: concepts[MLP0] @ model.blocks[0].mlp.W_out.detach()}
    for hook, vectors in resid.items():
        logits = (vectors * w) @ W_U
        for index in range(len(vectors)):
            mine = df[(df.hook == hook) & (df["index"] == index)]
            top = mine[mine.side == "top"].sort_values("rank")
            bottom = mine[mine.side == "bottom"].sort_values("rank")
            assert top.token_id.tolist() == logits[index].topk(k).indices.tolist()
            assert bottom.token_id.tolist() == (-logits[index]).topk(k).indices.tolist()
            assert top.logit.tolist() == pytest.approx(logits[index].topk(k).values.tolist(), 1e-4)
            assert top.token.tolist() == [model.tokenizer.decode([i]) for i in top.token_id]


def test_logit_lens_skips_unmappable_hooks(model):
    cs = ConceptSet({"blocks.0.mlp.hook_pre": torch.randn(1, 128), R1: torch.randn(1, 64)})
    with pytest.warns(UserWarning, match="hook_pre"):
        df = it.logit_lens(model, cs, k=3)
    assert set(df.hook) == {R1}


# ---- hinted scores ------------------------------------------------------------------------------


def test_auroc_with_ties_matches_hand_and_pairwise_count():
    # pairs: 1 beats 0; each 2 ties one 2 (0.5) and beats 0; 3 beats both -> 6 of 8
    assert it.auroc([1, 2, 2, 3], [2, 0]) == pytest.approx(0.75)
    assert it.auroc([1, 1], [1, 1, 1]) == 0.5
    assert it.auroc([3, 4], [1, 2]) == 1.0 and it.auroc([1, 2], [3, 4]) == 0.0
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 5, (23,), generator=g).float()  # many ties
    neg = torch.randint(0, 4, (17,), generator=g).float()
    assert it.auroc(pos, neg) == pytest.approx(_pairwise_auroc(pos.tolist(), neg.tolist()))
    with pytest.raises(ValueError, match="both classes"):
        it.auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        it.auroc([float("nan")], [1.0])


@pytest.fixture(scope="module")
def hinted(model):
    """A set with a planted separating direction (fit to the per-example mean activations),
    its negation, a zero direction (all ties) and a random one, and their hinted scores."""
    _, male = _brute(model, MALE, R1)
    _, female = _brute(model, FEMALE, R1)
    x = torch.stack([h[1:].mean(0) for h in male + female])  # skip_first: no BOS
    y = torch.tensor([1.0] * len(male) + [-1.0] * len(female))
    # 8 examples in 64 dimensions: the minimum-norm exact fit x @ d = y always exists.
    planted = torch.linalg.lstsq(x, y[:, None], driver="gelsd").solution[:, 0]
    g = torch.Generator().manual_seed(3)
    cs = ConceptSet(
        {R1: torch.stack([planted, -planted, torch.zeros(64), torch.randn(64, generator=g)])},
        labels={R1: ["planted", "negated", "zero", "random"]},
    )
    return cs, it.hinted_scores(model, cs, MALE, FEMALE), (male, female)


def test_hinted_scores_find_the_planted_direction(hinted):
    cs, scores, (male, female) = hinted
    assert scores.auroc.tolist()[:3] == [1.0, 0.0, 0.5]
    assert scores.sign.tolist()[:3] == [1, -1, 0]
    assert scores.separation.tolist()[:3] == [0.5, 0.5, 0.0]
    random_d = cs[R1][3]
    p = [float(h[1:].mean(0) @ random_d) for h in male]
    n = [float(h[1:].mean(0) @ random_d) for h in female]
    assert scores.auroc[3] == pytest.approx(_pairwise_auroc(p, n))
    assert scores.mean_positive[3] == pytest.approx(sum(p) / len(p), abs=1e-4)
    assert (scores.n_positive == 4).all() and (scores.n_negative == 4).all()
    assert scores.positive_data[0] == data_fingerprint(MALE)


@pytest.mark.parametrize("reduce", ["max", "last"])
def test_hinted_reductions_match_brute_force(model, hinted, reduce):
    cs, _, (male, female) = hinted
    scores = it.hinted_scores(model, cs, MALE, FEMALE, reduce=reduce)
    d = cs[R1][3]

    def value(h):
        proj = h[1:] @ d
        return float(proj.max() if reduce == "max" else proj[-1])

    expect = _pairwise_auroc([value(h) for h in male], [value(h) for h in female])
    assert scores.auroc[3] == pytest.approx(expect)
    assert scores.mean_positive[3] == pytest.approx(sum(map(value, male)) / 4, abs=1e-4)
    with pytest.raises(ValueError, match="reduce"):
        it.hinted_scores(model, cs, MALE, FEMALE, reduce="median")


def test_paired_hinted_scores_count_wins_per_pair(model, hinted):
    cs, _, (male, female) = hinted
    scores = it.hinted_scores(model, cs, MALE, FEMALE, paired=True)
    d = cs[R1][3]
    wins = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in zip(
            [float(h[1:].mean(0) @ d) for h in male],
            [float(h[1:].mean(0) @ d) for h in female],
            strict=True,
        )
    ]
    assert scores.auroc[3] == pytest.approx(sum(wins) / len(wins))
    assert scores.auroc.tolist()[:3] == [1.0, 0.0, 0.5] and scores.paired.all()
    assert it.paired_auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])) == 0.5
    with pytest.raises(ValueError, match="matched pairs"):
        it.hinted_scores(model, cs, MALE, FEMALE[:-1], paired=True)


def test_select_by_hints(hinted, tmp_path):
    cs, scores, _ = hinted
    chosen = it.select_by_hints(cs, scores, min_auroc=0.99)
    assert chosen.labels[R1] == ["planted (+hint, auroc 1.00)", "negated (-hint, auroc 0.00)"]
    assert torch.equal(chosen[R1], cs[R1][:2])
    step = chosen.provenance["history"][-1]
    assert step["op"] == "select_by_hints" and step["min_auroc"] == 0.99
    assert step["positive_data"] == [data_fingerprint(MALE)]
    assert step["negative_data"] == [data_fingerprint(FEMALE)]
    assert ConceptSet.load(chosen.save(tmp_path / "c")).labels == chosen.labels
    assert len(it.select_by_hints(cs, scores, min_auroc=0.99, max_per_hook=1)) == 1
    with pytest.raises(ValueError, match="no direction reaches"):
        it.select_by_hints(cs.select({R1: [2]}), scores[scores["index"] == 0].assign(
            auroc=0.5, separation=0.0, index=0))  # fmt: skip
    with pytest.raises(ValueError, match="not in this ConceptSet"):
        it.select_by_hints(cs.select({R1: [0]}), scores)


# ---- HTML report --------------------------------------------------------------------------------


def test_report_is_one_offline_page(model, concepts, acts, tmp_path):
    k = 3
    notes = {(R1, 0): "explains <things> & stuff"}
    path = it.report_html(
        model, concepts, None, tmp_path / "r" / "report.html", k=k, acts=acts,
        title="Gender <PCs>", explanations=notes,
    )  # fmt: skip
    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 3_000_000
    assert page.count("var CircuitsVis=") == 1  # the bundle, once
    assert not re.search(r"<script[^>]*\bsrc=", page, re.I)
    assert not re.search(r"""(from|import\()\s*["']https?://""", page)
    assert "unpkg.com" not in page and "<link" not in page
    assert "Gender &lt;PCs&gt;" in page and "explains &lt;things&gt; &amp; stuff" in page
    for label in ["PC0", "PC1", "PC2"]:
        assert f"<h2>{label}</h2>" in page
    blob = re.search(r'<script type="application/json" id="cv-props">(.*?)</script>', page, re.S)
    elements = json.loads(blob[1])
    assert len(elements) == concepts.n_directions * 2 * k
    assert all(f'id="{el}"' in page for el, _ in elements)
    light = it.report_html(model, concepts, TEXTS, tmp_path / "light.html", k=k, bundle=False)
    text = light.read_text(encoding="utf-8")
    assert "<script" not in text and light.stat().st_size < 200_000
    assert text.count('class="tok at"') == concepts.n_directions * 2 * k


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's scripts")
def test_report_scripts_run(model, concepts, acts, tmp_path):
    """The bundle loads as a classic script (global CircuitsVis) and the render loop calls
    CircuitsVis.render once per element with its props (render itself is stubbed: no DOM)."""
    path = it.report_html(model, concepts, None, tmp_path / "r.html", k=2, acts=acts)
    scripts = re.findall(r"<script(?: [^>]*)?>(.*?)</script>", path.read_text(), re.S)
    js_path = tmp_path / "scripts.json"
    js_path.write_text(json.dumps(scripts))
    runner = r"""
    const vm = require('vm'); const fs = require('fs');
    const [bundle, props, loop] = JSON.parse(fs.readFileSync(process.argv[1], 'utf8'));
    const calls = [];
    const document = {getElementById: id => id === 'cv-props' ? {textContent: props} : {}};
    const ctx = vm.createContext({document, console, window: {}});
    vm.runInContext(bundle, ctx);
    const real = ctx.CircuitsVis;  // its exports are getters: wrap instead of patching
    if (typeof real.ColoredTokens !== 'function' || typeof real.render !== 'function') {
        throw new Error('the bundle defines no global CircuitsVis.render / ColoredTokens');
    }
    ctx.CircuitsVis = {ColoredTokens: real.ColoredTokens, render: (id, el, p) => calls.push(
        [id, el === real.ColoredTokens, p.tokens.length === p.values.length])};
    vm.runInContext(loop, ctx);
    console.log(JSON.stringify(calls));
    """
    out = subprocess.run(["node", "-e", runner, str(js_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    calls = json.loads(out.stdout)
    assert len(calls) == concepts.n_directions * 2 * 2
    assert all(ok_el and ok_len for _, ok_el, ok_len in calls)


# ---- LLM explainer ------------------------------------------------------------------------------


class _FakeLLM:
    """A local OpenAI-compatible endpoint: the first requests fail as planned, then each
    answer names the direction in the prompt. Counts requests."""

    def __init__(self, plan=()):
        self.plan = list(plan)  # (status, headers, delay_s) for the first requests
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    {"path": self.path, "body": body, "headers": dict(self.headers)}
                )
                status, headers, delay = fake.plan.pop(0) if fake.plan else (200, {}, 0)
                threading.Event().wait(delay)
                prompt = body["messages"][-1]["content"]
                name = re.search(r"Direction \d+ at hook \S+?(?=\.?(\s|$))", prompt)[0]
                reply = {"choices": [{"message": {"role": "assistant", "content": f" {name}. "}}]}
                data = json.dumps(reply if status == 200 else {"error": "planned"}).encode()
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # requests to 127.0.0.1 must not go to a proxy
    servers = []

    def start(plan=()):
        servers.append(_FakeLLM(plan))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def tables(model, concepts, acts):
    small = concepts.select({R1: [0, 1]})
    return it.top_examples(model, small, acts=acts, k=3), it.logit_lens(model, small, k=4)


def test_explainer_retries_then_caches(fake_llm, tables, tmp_path, monkeypatch):
    examples, lens = tables
    server = fake_llm([(500, {}, 0), (429, {"Retry-After": "2"}, 0)])
    waits: list[float] = []
    monkeypatch.setattr(_http.time, "sleep", waits.append)
    monkeypatch.setenv("CAFT_TEST_KEY", "sk-test")
    kwargs = {"model": "fake", "api_key_env": "CAFT_TEST_KEY", "cache": tmp_path / "c.sqlite"}
    explainer = it.LLMExplainer(server.url, backoff=0.25, **kwargs)
    out = explainer.explain(examples, lens)
    assert out == {(R1, 0): f"Direction 0 at hook {R1}.", (R1, 1): f"Direction 1 at hook {R1}."}
    # Jittered exponential backoff (0.5-1 x 0.25 s), then the server's longer Retry-After.
    assert 0.125 <= waits[0] <= 0.25 and waits[1] == 2.0 and len(waits) == 2
    assert len(server.requests) == 2 + 2
    first = server.requests[-1]
    assert first["path"] == "/v1/chat/completions" and first["body"]["model"] == "fake"
    assert first["headers"]["Authorization"] == "Bearer sk-test"
    prompt = first["body"]["messages"][-1]["content"]
    assert "[[" in prompt and "Logit lens promotes" in prompt
    again = it.LLMExplainer(server.url, **kwargs).explain(examples, lens)
    assert again == out and len(server.requests) == 4  # the rerun is served from the cache


def test_explainer_errors_and_timeouts(fake_llm, tables, tmp_path, monkeypatch):
    examples, _ = tables
    monkeypatch.setattr(_http.time, "sleep", lambda s: None)
    server = fake_llm([(400, {}, 0)])
    explainer = it.LLMExplainer(server.url, model="fake", cache=None)
    with pytest.raises(it.ExplainerError, match="HTTP 400"):
        explainer.complete("Direction 0 at hook x")
    assert len(server.requests) == 1  # client errors are not retried
    server = fake_llm([(503, {}, 0)] * 3)
    with pytest.raises(it.ExplainerError, match="gave up after 3 attempts"):
        it.LLMExplainer(server.url, model="fake", max_retries=2, cache=None).complete(
            "Direction 0 at hook x"
        )
    server = fake_llm([(200, {}, 1.0)])  # the first answer comes too late
    slow = it.LLMExplainer(server.url, model="fake", timeout=0.3, cache=None)
    assert slow.complete("Direction 5 at hook y") == "Direction 5 at hook y."
    assert len(server.requests) == 2
    monkeypatch.setenv("CAFT_TL_EXPLAINER_BASE_URL", server.url + "/")
    monkeypatch.delenv("CAFT_TL_EXPLAINER_MODEL", raising=False)
    from_env = it.LLMExplainer(cache=None)
    assert from_env.base_url == server.url
    with pytest.raises(it.ExplainerError, match="CAFT_TL_EXPLAINER_MODEL"):
        from_env.complete("x")
    monkeypatch.setenv("CAFT_TL_EXPLAINER_MODEL", "env-model")
    assert it.LLMExplainer(cache=None).explain(examples)[(R1, 0)].startswith("Direction 0")
    assert server.requests[-1]["body"]["model"] == "env-model"


def test_retry_after_header_forms():
    assert _http.retry_after("3") == 3.0
    assert _http.retry_after(None) is None and _http.retry_after("soon") is None
    assert _http.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
