"""The service's web page: one self-contained HTML file (no external scripts, fonts or styles: it works offline) that
asks the JSON API and shows every answer with its sources. Text from the database is put in with ``textContent``,
never as HTML."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>retrolm</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  #info { color: #666; font-size: .85rem; margin-bottom: 1rem; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem; }
  .bar { margin: .5rem 0 1rem; display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; }
  button { font: inherit; padding: .35rem .9rem; cursor: pointer; }
  button:disabled { cursor: wait; }
  #status { color: #a00; }
  .answer { font-size: 1.1rem; background: #f3f6fa; padding: .6rem .8rem; border-radius: 4px; }
  .meta { color: #666; font-size: .8rem; margin: .3rem 0 .8rem; }
  .source { border-left: 3px solid #ccd; padding: .2rem .7rem; margin: .6rem 0; }
  .source.support { border-color: #2a7; }
  .source .head { font-size: .8rem; color: #555; }
  .source .cont { color: #777; }
  .span { background: #fffbe6; padding: .1rem .2rem; }
  .doclink { color: #0645ad; cursor: pointer; text-decoration: underline; }
  #doc { white-space: pre-wrap; background: #fafafa; border: 1px solid #ddd; padding: .7rem; display: none; }
</style>
</head>
<body>
<h1>retrolm</h1>
<div id="info">loading…</div>
<textarea id="text" rows="3" placeholder="A question, a search query, or a text to continue"></textarea>
<div class="bar">
  <button id="answer">Answer</button>
  <button id="search">Search</button>
  <button id="generate">Continue the text</button>
  <label>results <input id="k" type="number" min="1" value="5" style="width:4rem"></label>
  <span id="status"></span>
</div>
<div id="out"></div>
<h2 id="dochead" style="display:none; font-size:1rem"></h2>
<div id="doc"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const can = {answer: true, search: true, generate: true};  // what the service was started with
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function call(url, body) {
  const r = await fetch(url, body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function source(h, support) {
  const box = el("div", "source" + (support ? " support" : ""));
  const head = el("div", "head");
  const link = el("span", "doclink", h.doc_id);
  link.onclick = () => showDoc(h.doc_id);
  head.append(link, (h.shard ? ` · shard ${h.shard}` : "") + ` · chunk ${h.chunk_id}` +
    (h.score !== undefined && h.score !== null ? ` · score ${Number(h.score).toFixed(3)}` : "") +
    (h.rank !== undefined ? ` · ${h.hop ? `hop ${h.hop} ` : ""}retrieval rank ${h.rank + 1}` : "") +
    (support ? " · supports the answer" : ""));
  box.append(head, el("span", "", h.text));
  if (h.continuation) box.append(el("span", "cont", " ⟶ " + h.continuation));
  return box;
}
async function showDoc(id) {
  try {
    const d = await call("/api/document?id=" + encodeURIComponent(id));
    $("dochead").textContent = `${d.id} (${d.source}${d.shard ? ", shard " + d.shard : ""})`;
    $("dochead").style.display = $("doc").style.display = "block";
    $("doc").textContent = d.text;
    $("dochead").scrollIntoView();
  } catch (e) { $("status").textContent = e.message; }
}
async function run(kind) {
  const text = $("text").value, k = Number($("k").value) || 5, out = $("out");
  $("status").textContent = "";
  for (const b of document.querySelectorAll("button")) b.disabled = true;
  try {
    out.replaceChildren(el("div", "meta", "working…"));
    if (kind === "search") {
      const r = await call(`/api/search?q=${encodeURIComponent(text)}&k=${k}`);
      out.replaceChildren(el("div", "meta", `${r.hits.length} chunks (${r.retriever})`),
        ...r.hits.map((h) => source(h)));
    } else if (kind === "answer") {
      const r = await call("/api/answer", {question: text, passages: Math.min(k, 5)});
      const support = new Set(r.support);
      out.replaceChildren(el("div", "answer", r.answer || "(no answer)"),
        el("div", "meta", `${r.mode} · ${Number(r.flops.total).toExponential(2)} FLOPs · passages read:`),
        ...r.passages.map((p, i) => source(p, support.has(i))));
    } else {
      const r = await call("/api/generate", {prompt: text});
      const parts = [el("div", "meta", `${r.new_tokens} tokens in ${r.seconds.toFixed(2)} s · retrieval ` +
        (r.retrieval ? "on" : "off"))];
      const whole = el("div", "answer");
      whole.append(el("span", "", r.prompt));
      for (const c of r.chunks) whole.append(el("span", "span", c.text));
      parts.push(whole);
      r.chunks.forEach((c, i) => {
        parts.push(el("div", "meta", `span ${i + 1} “${c.text.trim().slice(0, 60)}” read:`));
        parts.push(...c.sources.map((h) => source(h)));
      });
      out.replaceChildren(...parts);
    }
  } catch (e) {
    out.replaceChildren();
    $("status").textContent = e.message;
  } finally {
    for (const b of document.querySelectorAll("button")) b.disabled = !can[b.id];
  }
}
$("answer").onclick = () => run("answer");
$("search").onclick = () => run("search");
$("generate").onclick = () => run("generate");
call("/api/info").then((i) => {
  $("info").textContent = `${i.db.path}: ${i.db.num_docs} documents, ${i.db.num_chunks} chunks` +
    (i.db.num_shards ? ` in ${i.db.num_shards} shards` : "") + ` · retrievers ` +
    `${i.retrievers.join(", ")} · reader ${i.reader || "none"} · generator ${i.generator || "none"}`;
  if (i.max_k) {  // a front whose parts serve fewer results than 5
    $("k").max = i.max_k;
    $("k").value = Math.min(Number($("k").value) || 5, i.max_k);
  }
  can.answer = !!i.reader;
  can.generate = !!i.generator;
  $("answer").disabled = !can.answer;
  $("generate").disabled = !can.generate;
}).catch((e) => { $("info").textContent = e.message; });
</script>
</body>
</html>
"""

__all__ = ["PAGE"]
