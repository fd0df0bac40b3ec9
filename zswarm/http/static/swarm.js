// The Swarm page: polls /api/p2p every second and redraws; fetches the token once.
// Plain DOM, no framework. Every value from the cluster goes in through textContent, never
// innerHTML: node names and models come from other machines.
"use strict";

(function () {
  const REFRESH_MS = 1000;
  const TIMEOUT_MS = 2500;
  const KEY_STORE = "zswarm.apiKey";
  const GROUPS = ["federated", "servers", "workers", "balancers"];
  const ROLE_LABEL = { federated: "federated", servers: "server", workers: "worker", balancers: "entry point" };

  const $ = (id) => document.getElementById(id);
  const state = { data: null, token: null, tokenStatus: "", tokenRefused: false, filter: "all", search: "", lastOk: 0, error: "" };

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function apiKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; }
  }

  class NeedKey extends Error {}

  async function get(path, asText) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    const headers = { Accept: asText ? "text/plain" : "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    try {
      const r = await fetch(path, { headers, signal: ctl.signal, cache: "no-store" });
      if (r.status === 401) throw new NeedKey("an API key is needed");
      if (!r.ok) {
        let msg = r.status + " " + r.statusText;
        try { const b = await r.json(); if (b && b.error && b.error.message) msg = b.error.message; } catch (e) { /* not JSON */ }
        const err = new Error(msg);
        err.status = r.status;
        throw err;
      }
      return asText ? await r.text() : await r.json();
    } catch (e) {
      if (e.name === "AbortError") throw new Error("the node did not answer within " + TIMEOUT_MS / 1000 + " s");
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  // --- formatting ---
  function bytes(n) {
    if (!n) return "0";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + u[i];
  }
  function ago(s) {
    if (s < 1) return "now";
    if (s < 90) return Math.round(s) + " s ago";
    return Math.round(s / 60) + " min ago";
  }
  function color(i) { return "hsl(" + ((i * 137.5 + 220) % 360).toFixed(0) + " 55% 48%)"; }

  // --- copy ---
  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      try { await navigator.clipboard.writeText(text); return true; } catch (e) { /* fall back */ }
    }
    // plain http from another machine is not a secure context: the old way still works there
    const ta = el("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.appendChild(ta);
    ta.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    ta.remove();
    return ok;
  }

  function wireCopyButtons() {
    document.querySelectorAll("button[data-copy]").forEach((b) => {
      b.addEventListener("click", async () => {
        const text = $(b.dataset.copy).textContent;
        const ok = await copyText(text);
        b.textContent = ok ? "Copied" : "Copy failed";
        b.classList.toggle("done", ok);
        setTimeout(() => { b.textContent = "Copy"; b.classList.remove("done"); }, 1500);
      });
    });
  }

  // --- token and commands ---
  function drawJoin() {
    const token = state.token;
    const addr = state.data && state.data.node.gossip;
    $("token").textContent = token || (state.tokenStatus || "…");
    $("copy-token").disabled = !token;
    // The token goes in the environment, never on the command line, where every local user
    // of the other machine could read it (ps, /proc/PID/cmdline).
    const env = "ZSWARM_TOKEN=" + token;
    const cmds = {
      "cmd-worker": env + " zswarm worker --bootstrap " + addr,
      "cmd-federated": env + " zswarm server --p2p --federated --bootstrap " + addr,
      "cmd-balancer": env + " zswarm federated --bootstrap " + addr,
    };
    const ready = Boolean(token && addr);
    for (const [id, text] of Object.entries(cmds)) {
      if (ready) setCommand($(id), text, env);
      else $(id).textContent = token === "" ? "—" : (state.tokenRefused ? "the token is needed (see the token card)" : "…");
      document.querySelector('button[data-copy="' + id + '"]').disabled = !ready;
    }
    $("join-hint").textContent = token === ""
      ? "This node is in no cluster: start it with --p2p (a new token is made) or --token to build one."
      : state.tokenRefused
        ? "Get the token with `zswarm admin token` on this node's machine, then run one of these on another machine with ZSWARM_TOKEN set to it."
        : "Run one of these on another machine; it finds the rest of the cluster through this node (" + (addr || "…") + ").";
  }

  // Lines may wrap inside the token only, never inside a flag such as --bootstrap; the text
  // (what the copy button copies) stays exactly the command.
  function setCommand(code, text, tokenPart) {
    const parts = text.split(" ");
    code.replaceChildren(...parts.flatMap((part, i) =>
      [el("span", part === tokenPart ? "tok" : "nw", part)].concat(i < parts.length - 1 ? [document.createTextNode(" ")] : [])));
  }

  async function loadToken() {
    try {
      state.token = (await get("/api/p2p/token", true)).trim();
      state.tokenStatus = "";
      state.tokenRefused = false;
    } catch (e) {
      if (e instanceof NeedKey) throw e;
      state.tokenRefused = e.status === 403;
      if (e.status === 404) { state.token = ""; state.tokenStatus = "This node is in no cluster."; }
      else if (e.status === 403) { state.token = null; state.tokenStatus = e.message; }
      else { state.token = null; state.tokenStatus = "Not available: " + e.message; }
    }
    drawJoin();
  }

  // --- the nodes ---
  function allNodes(d) {
    const out = [];
    for (const g of GROUPS) for (const n of d[g] || []) out.push(Object.assign({ group: g }, n));
    return out;
  }

  function drawHeader(d) {
    const w = $("where");
    w.textContent = "";
    w.append(el("b", "", d.node.name || d.node.id), " · " + d.node.role);
    if (d.node.network_id) w.append(" · network " + d.node.network_id);
    if (d.node.gossip) w.append(" · " + d.node.gossip);
    $("open-warning").hidden = !d.node.open_to_network;
    $("open-address").textContent = location.host;
  }

  function drawStats(d) {
    let online = 0, total = 0;
    for (const g of GROUPS) {
      const nodes = d[g] || [];
      const on = nodes.filter((n) => n.online).length;
      online += on; total += nodes.length;
      const box = document.querySelector('.stat[data-group="' + g + '"]');
      box.querySelector("b").textContent = on;
      box.querySelector("span").textContent = "/" + nodes.length;
      box.classList.toggle("down", on < nodes.length);
      document.querySelector('[data-filter="' + g + '"] span').textContent = nodes.length;
    }
    document.querySelector('[data-filter="all"] span').textContent = total;
  }

  function memCell(n) {
    const td = el("td", "c-mem");
    if (!n.mem_total) { td.textContent = "—"; return td; }
    const used = Math.max(0, n.mem_total - n.mem_free);
    const frac = Math.min(1, used / n.mem_total);
    const bar = el("span", "membar" + (frac > 0.85 ? " high" : ""));
    const fill = el("div");
    fill.style.width = (frac * 100).toFixed(1) + "%";
    bar.append(fill);
    bar.title = bytes(n.mem_free) + " free of " + bytes(n.mem_total);
    td.append(bar, el("span", "memtext", bytes(used) + " / " + bytes(n.mem_total)));
    return td;
  }

  function row(n) {
    const tr = el("tr", n.online ? "" : "off");
    tr.dataset.nodeId = n.id;
    tr.dataset.state = n.state;
    const st = el("td", "c-state");
    st.append(el("span", "pill " + n.state, n.state === "alive" ? "online" : n.state === "dead" ? "offline" : "suspect"));
    const name = el("td", "c-name");
    name.append(el("span", "nname", n.name || "(unnamed)"), el("span", "nid", n.id.slice(0, 8)));
    if (n.self) name.append(el("span", "me", "this node"));
    if (n.held_by) {
      // a worker serves one server's split at a time
      const by = n.held_by.self ? "this node" : (n.held_by.name || n.held_by.id.slice(0, 8));
      const tag = el("span", "by", "serves " + by);
      tag.title = "This worker serves the split of " + (n.held_by.self ? "this node" : "server " + by + " · " + n.held_by.id) +
        (n.held_by.held ? "" : " (claim settling)") + "; other servers leave it out.";
      name.append(tag);
    }
    name.title = n.name + " · " + n.id + (n.endpoints.gossip ? " · " + n.endpoints.gossip : "") + (n.software ? " · zswarm " + n.software : "");
    const model = el("td", "c-model", n.models.length ? n.models.join(", ") : (n.fetching || []).length ? "" : "—");
    model.title = n.models.join(", ");
    for (const f of n.fetching || []) {
      // a model file this node is fetching from its peers (it serves it once whole and verified)
      const bar = el("span", "membar fetchbar");
      const fill = el("div");
      fill.style.width = Math.min(100, f.percent).toFixed(1) + "%";
      bar.append(fill);
      const wrap = el("span", "fetching");
      wrap.append(bar, el("span", "memtext", "fetching " + f.name + " " + f.percent.toFixed(0) + "%"));
      wrap.title = "Fetching " + f.name + " from peers: " + f.percent.toFixed(1) + "%";
      model.append(wrap);
    }
    tr.append(st, name, el("td", "c-role role", ROLE_LABEL[n.group] || n.role), model, memCell(n),
      el("td", "c-num c-inflight", n.in_flight),
      el("td", "c-num c-layers", n.layers === null || n.layers === undefined ? "—" : n.layers),
      el("td", "c-num c-served", n.served),
      el("td", "c-num c-prefix", n.prefix_hits || 0),
      el("td", "c-num c-tps", n.decode_tps ? n.decode_tps.toFixed(0) : "—"),
      el("td", "c-seen", n.self ? "this node" : ago(n.last_seen_s)));
    return tr;
  }

  function drawRows() {
    const d = state.data;
    if (!d) return;
    const q = state.search.toLowerCase();
    const nodes = allNodes(d).filter((n) =>
      (state.filter === "all" || n.group === state.filter) &&
      (!q || (n.name + " " + n.id + " " + n.models.join(" ") + " " + n.role).toLowerCase().includes(q)));
    const body = $("rows");
    const frag = document.createDocumentFragment();
    for (const n of nodes) frag.append(row(n));
    body.replaceChildren(frag);
    $("rows-empty").hidden = nodes.length > 0;
  }

  function drawTaken(d) {
    const taken = d.taken || [];
    const waiting = d.waiting || [];
    const box = $("split-taken");
    box.hidden = taken.length === 0 && waiting.length === 0;
    if (waiting.length) {
      box.textContent = "Waiting for workers to start: " + waiting.join(", ") + " (the model is split once they are up).";
      return;
    }
    if (!taken.length) { box.textContent = ""; return; }
    // the node's own words when it gave them (it knows whether it runs alone or waits)
    const list = taken.map((t) => (t.name || t.id.slice(0, 8)) + " is in use by " + (t.by_name || t.by.slice(0, 8))).join("; ");
    box.textContent = (d.shard_note || list + ": this node leaves " + (taken.length === 1 ? "it" : "them") + " out") +
      ". A worker serves one server's split at a time.";
  }

  function drawRevoked(d) {
    const revoked = d.revoked || [];
    $("revoked-card").hidden = revoked.length === 0;
    const ul = $("revoked");
    ul.textContent = "";
    for (const r of revoked) {
      const li = document.createElement("li");
      li.textContent = (r.name || "?") + " · " + r.id + (r.at ? " · " + new Date(r.at * 1000).toLocaleString() : "");
      ul.appendChild(li);
    }
  }

  function drawSplit(d) {
    drawTaken(d);
    const s = d.split;
    const empty = $("split-empty");
    empty.hidden = Boolean(s);
    $("split").hidden = !s;
    // a server whose model cannot be placed says why (a shortfall names the missing memory)
    empty.textContent = d.shard_error && !s ? "The model cannot be loaded: " + d.shard_error
      : "This node's model is not split across workers.";
    empty.className = d.shard_error && !s ? "error" : "muted";
    if (!s) { $("split-title").textContent = ""; return; }
    const total = s.n_layers || s.parts.reduce((a, p) => a + p.layers, 0) || 1;
    $("split-title").textContent = (s.model ? "· " + s.model + " " : "") + "· " + s.n_layers + " layers" +
      " on " + s.parts.length + " node" + (s.parts.length === 1 ? "" : "s") + (s.reshards ? " · re-split " + s.reshards + "×" : "");
    const stack = $("split-stack");
    const parts = $("split-parts");
    const sf = document.createDocumentFragment();
    const pf = document.createDocumentFragment();
    s.parts.forEach((p, i) => {
      const c = color(i);
      const label = (p.name || p.id) + (p.local ? " (this node)" : "");
      const seg = el("div", "", p.layers ? label + " · " + p.layers : "");
      seg.style.flex = String(Math.max(p.layers, 0.0001));
      seg.style.background = c;
      seg.title = label + ": " + p.layers + " of " + total + " layers";
      sf.append(seg);
      const nm = el("div", "pn");
      const sw = el("span", "swatch");
      sw.style.background = c;
      nm.append(sw, label);
      nm.title = label;
      const bar = el("div", "pbar");
      const fill = el("div");
      fill.style.width = (100 * p.layers / total).toFixed(1) + "%";
      fill.style.background = c;
      bar.append(fill);
      pf.append(nm, bar, el("div", "pv", p.layers + " / " + total + " layers" + (p.mem ? " · " + bytes(p.mem) : "")));
    });
    stack.replaceChildren(sf);
    parts.replaceChildren(pf);
    $("split-error").textContent = s.error ? "Last split failed: " + s.error : "";
  }

  function drawLive() {
    const live = $("live");
    const ok = !state.error;
    live.classList.toggle("ok", ok && state.lastOk > 0);
    live.classList.toggle("bad", !ok);
    $("nodes").classList.toggle("stale", !ok);
    const since = state.lastOk ? (Date.now() - state.lastOk) / 1000 : 0;
    $("live-text").textContent = ok
      ? (state.lastOk ? "live · updated " + (since < 1.5 ? "just now" : Math.round(since) + " s ago") : "connecting…")
      : "cannot reach the node: " + state.error + (state.lastOk ? " (data from " + Math.round(since) + " s ago)" : "");
  }

  // --- the loop ---
  let needToken = true;

  async function refresh() {
    try {
      const d = await get("/api/p2p");
      state.data = d;
      state.error = "";
      state.lastOk = Date.now();
      $("auth").hidden = true;
      drawHeader(d);
      drawStats(d);
      drawRows();
      drawSplit(d);
      drawRevoked(d);
      // a rotation (zswarm admin revoke / rotate-token) changes the token: fetch it again
      if (d.node.network_id !== state.network) { state.network = d.node.network_id; needToken = true; }
      if (needToken) { needToken = false; await loadToken(); } else { drawJoin(); }
    } catch (e) {
      if (e instanceof NeedKey) {
        $("auth").hidden = false;
        state.error = "an API key is needed";
        needToken = true;
      } else {
        state.error = e.message || String(e);
      }
    }
    drawLive();
  }

  async function loop() {
    await refresh();
    setTimeout(loop, $("auth").hidden ? REFRESH_MS : 3000);
  }

  function init() {
    wireCopyButtons();
    document.querySelectorAll("[data-filter]").forEach((b) => b.addEventListener("click", () => {
      state.filter = b.dataset.filter;
      document.querySelectorAll("[data-filter]").forEach((x) => x.classList.toggle("on", x === b));
      drawRows();
    }));
    $("search").addEventListener("input", (e) => { state.search = e.target.value; drawRows(); });
    $("auth-form").addEventListener("submit", (e) => {
      e.preventDefault();
      try { sessionStorage.setItem(KEY_STORE, $("auth-key").value.trim()); } catch (err) { /* private mode */ }
      $("auth-error").textContent = "";
      needToken = true;
      refresh().then(() => { if (!$("auth").hidden) $("auth-error").textContent = "That key was refused."; });
    });
    setInterval(drawLive, 1000);
    loop();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
