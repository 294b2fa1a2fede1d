"""The atlas page: one HTML file with its data, script and style inlined (opens from ``file://``, no network).

The data (:func:`latent_atlas.atlas.data.atlas_data`) is embedded as JSON in a ``<script type="application/json">``
element; the page's script only displays it. State (document, token, layer, lens, colouring) lives in the URL's
fragment, e.g. ``atlas.html#doc=NA-003&token=5&layer=15&lens=tuned``, so a view can be linked and a headless
browser can open a chosen token. Machine-readable attributes on the rendered elements (``data-id``, ``data-p``,
``data-row``, ``data-score``) let tests read the DOM after the script ran.
"""

import html
import json
import os
from collections.abc import Mapping
from typing import Any

from latent_atlas.addresses import resid_address
from latent_atlas.atlas.data import used_ids
from latent_atlas.errors import LatentAtlasError
from latent_atlas.provenance import atomic_output

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:8px 16px;background:#263238;color:#eceff1}
header h1{font-size:18px;margin:0 0 4px}
header .meta{font-size:12px;color:#b0bec5}
#controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;padding:8px 16px;background:#eceff1;
  border-bottom:1px solid #cfd8dc;position:sticky;top:0;z-index:2}
#controls label{font-size:13px}
main{display:grid;grid-template-columns:minmax(300px,1fr) minmax(420px,1.3fr);gap:12px;padding:12px 16px}
section{background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px 10px;overflow:auto}
h2{font-size:15px;margin:2px 0 8px}
#tokens{line-height:2.1;font-family:ui-monospace,monospace;font-size:13px}
.tok{white-space:pre-wrap;padding:1px 1px;border-radius:2px;cursor:pointer;border:1px solid transparent}
.tok.selected{border-color:#d32f2f;outline:1px solid #d32f2f}
.tok.massive{text-decoration:underline wavy #d32f2f}
.legend{font-size:12px;color:#555;margin:4px 0}
table{border-collapse:collapse;font-size:12px;width:100%}
th,td{border-bottom:1px solid #eee;padding:2px 4px;text-align:left;vertical-align:top}
tr.current{background:#fff8e1}
.cand{display:inline-block;font-family:ui-monospace,monospace;background:#e3f2fd;border-radius:3px;padding:0 3px;
  margin:1px 2px 1px 0;white-space:pre}
.cand.final{background:#c8e6c9}
.cand small,.dim{color:#777}
.flag{color:#d32f2f;font-weight:bold}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap}
.ctx b{background:#ffe082}
.steer td:first-child{white-space:nowrap}
footer{font-size:11px;color:#777;padding:6px 16px}
"""

SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('atlas-data').textContent);
  const meta = data.meta, docs = data.documents, layers = meta.layers;
  const state = {doc: 0, token: 0, layer: Math.floor(layers.length / 2), lens: meta.lenses[0], colour: 'kl'};
  state.hover = null;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  const address = (layer) => 'resid.' + String(layer).padStart(2, '0');  // as addresses.resid_address
  const text = (id) => (id in data.vocab ? data.vocab[id] : '\u27e8' + id + '\u27e9');
  const shown = (id) => esc(text(id)).replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5');
  const fmt = (x, d) => (x === null || x === undefined ? '\u2013' : Number(x).toFixed(d));
  const doc = () => docs[state.doc];

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.has('doc')) {
      const found = docs.findIndex((d) => d.doc_id === params.get('doc'));
      if (found >= 0) state.doc = found;
    }
    if (params.has('token')) state.token = Math.max(0, Math.min(doc().ids.length - 1, +params.get('token') || 0));
    if (params.has('layer')) {
      const found = layers.indexOf(+params.get('layer'));
      if (found >= 0) state.layer = found;
    }
    if (params.has('lens') && meta.lenses.includes(params.get('lens'))) state.lens = params.get('lens');
    if (params.has('colour')) state.colour = params.get('colour');
  }

  function writeHash() {
    const params = new URLSearchParams({doc: doc().doc_id, token: state.token, layer: layers[state.layer],
      lens: state.lens, colour: state.colour});
    history.replaceState(null, '', '#' + params.toString());
  }

  function controls() {
    $('doc').innerHTML = docs.map((d, i) => '<option value="' + i + '">' + esc(d.doc_id) + ' \u2014 ' +
      esc(d.label) + '</option>').join('');
    $('lens').innerHTML = meta.lenses.map((name) => '<label><input type="radio" name="lens" value="' + name +
      '"> ' + name + '</label>').join(' ');
    $('layer').max = layers.length - 1;
    $('doc').onchange = (e) => { state.doc = +e.target.value; state.token = 0; render(); };
    $('layer').oninput = (e) => { state.layer = +e.target.value; render(); };
    $('colour').onchange = (e) => { state.colour = e.target.value; render(); };
    for (const radio of document.querySelectorAll('input[name=lens]')) {
      radio.onchange = (e) => { state.lens = e.target.value; render(); };
    }
  }

  function quantity(d, i) {
    const reading = d.lenses[state.lens];
    if (state.colour === 'norm') return d.norm[state.layer][i];
    if (!reading || reading.ids[state.layer] === null) return null;
    if (state.colour === 'agree') return reading.agree[state.layer][i];
    if (state.colour === 'kl') return reading.kl[state.layer][i];
    return null;
  }

  function colourOf(value, top) {
    if (value === null || state.colour === 'none') return 'transparent';
    if (state.colour === 'agree') return value ? 'hsl(130,55%,78%)' : 'hsl(0,0%,90%)';
    const t = Math.min(1, state.colour === 'norm' ? Math.log2(1 + value) / Math.log2(1 + top) : value / top);
    return 'hsl(' + (state.colour === 'norm' ? 30 : 210) + ',80%,' + (96 - 46 * t) + '%)';
  }

  function tokens() {
    const d = doc();
    const values = d.ids.map((_, i) => quantity(d, i));
    const top = Math.max(1e-9, ...values.filter((v) => v !== null));
    const massive = meta.massive_multiple;
    $('tokens').innerHTML = d.ids.map((id, i) => '<span class="tok' + (i === state.token ? ' selected' : '') +
      (d.norm[state.layer][i] > massive ? ' massive' : '') + '" data-i="' + i + '" data-id="' + id +
      '" style="background:' + colourOf(values[i], top) + '" title="' + fmt(values[i], 3) + '">' + shown(id) +
      '</span>' + (text(id).includes('\n') ? '<br>' : '')).join('');
    const what = {kl: 'KL(final \u2016 ' + state.lens + ' lens), nats',
      norm: '\u2016h\u2016 / typical \u2016h\u2016 of the layer',
      agree: state.lens + ' lens top-1 = final top-1', none: 'no colouring'}[state.colour];
    $('legend').innerHTML = esc(d.doc_id) + ' (' + esc(d.label) + ', ' + d.ids.length + ' of ' + d.token_count +
      ' tokens) at ' + address(layers[state.layer]) + ': ' + what + (state.colour === 'agree' || state.colour === 'none'
      ? '' : ' (darkest = ' + fmt(top, 3) + ')') + '; wavy underline: norm > ' + massive + '\u00d7 typical';
    for (const span of document.querySelectorAll('#tokens .tok')) {
      span.onclick = () => { state.token = +span.dataset.i; state.hover = null; render(); };
      span.onmouseenter = () => { state.hover = +span.dataset.i; detail(); neighbours(); };
    }
    $('tokens').onmouseleave = () => { state.hover = null; detail(); neighbours(); };
  }

  function candidates(ids, probs, finalId) {
    return ids.map((id, r) => '<span class="cand' + (id === finalId ? ' final' : '') + '" data-id="' + id +
      '" data-p="' + probs[r] + '">' + shown(id) + ' <small>' + fmt(probs[r], 3) + '</small></span>').join('');
  }

  function detail() {
    const d = doc(), i = state.hover === null ? state.token : state.hover, finalId = d.model.ids[i][0];
    const next = i + 1 < d.ids.length ? shown(d.ids[i + 1]) : '<span class="dim">(not shown)</span>';
    const firsts = meta.lenses.map((name) => name + ' lens: ' + (d.lenses[name].first[i] === null ? 'never'
      : address(d.lenses[name].first[i]))).join('; ');
    let rows = '';
    layers.forEach((layer, l) => {
      const norm = d.norm[l][i], massive = norm > meta.massive_multiple;
      rows += '<tr class="layer' + (l === state.layer ? ' current' : '') + '" data-layer="' + layer + '"><td>' +
        address(layer) + '</td><td data-norm="' + norm + '">' + fmt(norm, 2) +
        (massive ? ' <span class="flag">massive</span>' : '') + '</td>';
      for (const name of meta.lenses) {
        const reading = d.lenses[name];
        rows += reading.ids[l] === null ? '<td class="dim">not trained here</td>'
          : '<td class="reading" data-lens="' + name + '" data-layer="' + layer + '" data-kl="' + reading.kl[l][i] +
            '">' + candidates(reading.ids[l][i], reading.probs[l][i], finalId) + ' <small class="dim">KL ' +
            fmt(reading.kl[l][i], 2) + '</small></td>';
      }
      rows += '</tr>';
    });
    $('detail').innerHTML = '<p id="selected" data-doc="' + esc(d.doc_id) + '" data-token="' + i + '" data-id="' +
      d.ids[i] + '">Token ' + i + ' <span class="cand">' + shown(d.ids[i]) + '</span> of ' + esc(d.doc_id) +
      '; next token in the text: <span class="cand">' + next + '</span></p>' +
      '<p>Model\u2019s own prediction (last layer): <span id="model-prediction">' +
      candidates(d.model.ids[i], d.model.probs[i], finalId) + '</span></p>' +
      '<p>Final top-1 first becomes the top-1 at: ' + firsts + '</p>' +
      '<table><thead><tr><th>layer</th><th>\u2016h\u2016/typical</th>' +
      meta.lenses.map((name) => '<th>' + name + ' lens: top ' + meta.top_k + '</th>').join('') +
      '</tr></thead><tbody>' + rows + '</tbody></table>';
  }

  function context(row) {
    const [storeDoc, pos, ids, offset] = data.contexts[row];
    const [docId, label, split] = data.store_docs[storeDoc];
    const words = ids.map((id, j) => (j === offset ? '<b>' + shown(id) + '</b>' : shown(id))).join('');
    return {docId, label, split, pos, words};
  }

  function neighbours() {
    const d = doc(), i = state.hover === null ? state.token : state.hover, nb = meta.neighbours;
    const rows = d.neighbours.rows[state.layer][i], scores = d.neighbours.scores[state.layer][i];
    const body = rows.map((row, r) => {
      const c = context(row);
      return '<tr class="nn" data-row="' + row + '" data-score="' + scores[r] + '" data-doc="' + esc(c.docId) +
        '"><td>' + (r + 1) + '</td><td>' + fmt(scores[r], 3) + '</td><td>' + esc(c.docId) +
        '<br><span class="dim">' + esc(c.label) + ' \u00b7 ' + esc(c.split) + ' \u00b7 pos ' + c.pos +
        '</span></td><td class="ctx">' + c.words + '</td></tr>';
    }).join('');
    $('neighbours').innerHTML = '<h2 id="neighbours-title" data-layer="' + layers[state.layer] + '" data-token="' + i +
      '">Nearest stored states at ' + address(layers[state.layer]) + '</h2><p class="legend">Exact ' + nb.metric +
      (nb.standardised ? ' (standardised)' : '') + ' search over all ' + nb.stored_rows + ' stored states' +
      (nb.skip_first_position ? ', position 0 left out' : '') + ', the token\u2019s own state left out; ' +
      (nb.metric === 'cosine' ? 'cosine similarity' : 'Euclidean distance') + '.</p><table><thead><tr><th>#</th><th>' +
      (nb.metric === 'cosine' ? 'cos' : 'dist') + '</th><th>document</th><th>context</th></tr></thead><tbody>' + body +
      '</tbody></table>';
  }

  function steering() {
    if (!data.steering.length) { $('steering-panel').style.display = 'none'; return; }
    const run = (r) => '<tr><td>' + esc(r.method) + ' @ ' + address(r.layer) + '</td><td>\u00d7' + r.coefficient +
      '</td><td>' + esc(r.continuation) + '</td><td class="dim">' + fmt(r.sentiment, 2) + '</td></tr>';
    $('steering').innerHTML = data.steering.map((s) => '<h3>' + esc(s.prompt) + ' <span class="dim">(' +
      esc(s.decoding) + ', sample ' + s.sample + ')</span></h3><table class="steer"><tbody><tr><td><b>unsteered</b>' +
      '</td><td></td><td>' + esc(s.unsteered === null ? '\u2013' : s.unsteered) + '</td><td class="dim">' +
      fmt(s.unsteered_sentiment, 2) + '</td></tr>' + s.runs.map(run).join('') + '</tbody></table>').join('') +
      '<p class="legend">Last column: the sentiment score of the continuation (the steering analysis\u2019s).</p>';
  }

  function render() {
    $('doc').value = state.doc;
    $('layer').value = state.layer;
    $('layer-name').textContent = address(layers[state.layer]);
    $('colour').value = state.colour;
    for (const radio of document.querySelectorAll('input[name=lens]')) radio.checked = radio.value === state.lens;
    tokens(); detail(); neighbours(); writeHash();
  }

  controls(); readHash(); steering(); render();
  window.addEventListener('hashchange', () => { readHash(); render(); });
  document.body.dataset.ready = 'true';
  window.atlas = {data, state, render};
})();
"""

BODY = """<header><h1>{title}</h1><div class="meta">{subtitle}</div></header>
<div id="controls">
<label>Document <select id="doc"></select></label>
<label>Layer <input id="layer" type="range" min="0" step="1"> <b id="layer-name"></b></label>
<span>Lens <span id="lens"></span></span>
<label>Colour tokens by <select id="colour">
<option value="kl">KL to the final distribution</option><option value="norm">norm / typical norm</option>
<option value="agree">top-1 agreement with the final</option><option value="none">nothing</option></select></label>
</div>
<main>
<div>
<section><h2>Document</h2><div id="legend" class="legend"></div><div id="tokens"></div>
<p class="legend">Hover a token to read it; click to keep it selected. The view is in the address (#doc=...).
</p></section>
<section id="neighbours"></section>
</div>
<div>
<section><h2>What the state reads as, layer by layer</h2><div id="detail"></div></section>
<section id="steering-panel"><h2>Steering: continuations by method and strength</h2><div id="steering"></div></section>
</div>
</main>
<footer>{footer}</footer>
"""


def _json_for_html(payload: Mapping[str, Any]) -> str:
    """Compact JSON that cannot end its ``<script>`` element early (every ``<`` escaped)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")


def render_page(payload: Mapping[str, Any]) -> str:
    """The whole HTML page for one atlas payload."""
    meta = payload["meta"]
    title = f"latent-atlas: {meta['model']} on {meta['corpus']}"
    lenses = " and ".join(f"{name} lens" for name in meta["lenses"])
    first, last = resid_address(meta["layers"][0]), resid_address(meta["layers"][-1])
    subtitle = (
        f"{len(payload['documents'])} {meta['split']} documents (of {meta['documents_sampled']} sampled), "
        f"{len(meta['layers'])} layers ({first}..{last}), {lenses}"
    )
    provenance = meta.get("provenance", {})
    footer = "; ".join(f"{key}: {value}" for key, value in provenance.items() if not isinstance(value, (dict, list)))
    body = BODY.format(title=html.escape(title), subtitle=html.escape(subtitle), footer=html.escape(footer))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f'<meta name="latent-atlas-provenance" content="{html.escape(json.dumps(provenance, default=str))}">'
        f"<style>{STYLE}</style></head>\n<body>\n{body}"
        f'<script id="atlas-data" type="application/json">{_json_for_html(payload)}</script>\n'
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )


def within_budget(payload: Mapping[str, Any], max_bytes: int) -> tuple[dict[str, Any], str]:
    """The payload with as many documents as fit in ``max_bytes``, and its page.

    Documents are dropped from the end (the last round over labels first); the contexts and vocabulary are cut
    to what the kept documents use.
    """
    documents = list(payload["documents"])
    while documents:
        kept = _restricted(payload, documents)
        page = render_page(kept)
        if len(page.encode()) <= max_bytes:
            return kept, page
        documents.pop()
    raise LatentAtlasError(
        f"the atlas page of {payload['meta']['model']} on {payload['meta']['corpus']} does not fit in "
        f"atlas.max_bytes = {max_bytes} bytes even with one document; raise atlas.max_bytes or lower "
        "atlas.max_tokens, atlas.top_k or atlas.neighbours.k"
    )


def _restricted(payload: Mapping[str, Any], documents: list[dict[str, Any]]) -> dict[str, Any]:
    """The payload for a subset of its documents (contexts, store documents and vocabulary cut to match)."""
    rows = {
        str(row)
        for document in documents
        for layer in document["neighbours"]["rows"]
        for token in layer
        for row in token
    }
    contexts = {row: context for row, context in payload["contexts"].items() if row in rows}
    store_docs = {str(context[0]) for context in contexts.values()} | {str(d["store_doc"]) for d in documents}
    ids = {str(i) for i in used_ids(documents, {int(row): context for row, context in contexts.items()})}
    return {
        **payload,
        "documents": documents,
        "contexts": contexts,
        "store_docs": {key: value for key, value in payload["store_docs"].items() if key in store_docs},
        "vocab": {key: value for key, value in payload["vocab"].items() if key in ids},
    }


def write_page(payload: Mapping[str, Any], path: str | os.PathLike[str], max_bytes: int) -> dict[str, Any]:
    """Write the page within its budget, atomically; returns the payload it holds."""
    kept, page = within_budget(payload, max_bytes)
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return kept
