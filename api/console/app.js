// capy's operator console: vanilla JS, no build step, nothing from another origin.
//
// Safety rules this file keeps (the page's CSP backs them up):
// - every string from the server reaches the DOM through textContent / createTextNode
//   (the `h` helper below); never innerHTML, insertAdjacentHTML, document.write, eval;
// - no inline handlers or style attributes: listeners are added with addEventListener,
//   looks come from classes in app.css;
// - the API key lives in sessionStorage only and leaves the page only as the
//   Authorization header of same-origin requests.
"use strict";

(function () {
  const KEY_STORAGE = "capy.console.key";
  const FINAL_STATES = ["completed", "failed", "cancelled"];
  const JOB_STATES = ["pending", "claimed", "completed", "failed", "cancelled"];
  const JOB_TYPES = [
    "project.create", "project.update", "project.delete", "project.extension_enable",
    "project.extension_disable", "project.storage_check", "project.rotate_credentials",
    "project.retire_credentials", "project.backup", "project.backup_verify",
    "backup.delete", "project.restore", "capy.backup_expire", "project.preview_create",
    "project.preview_reset", "project.preview_delete", "capy.preview_expire",
    "project.stop", "project.start",
  ];
  const SVG_NS = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------- DOM helpers

  // Builds an element. `attrs` values are set with setAttribute (never `on…` or
  // `style`); children are nodes or strings (strings become text nodes).
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    if (!attrs) return;
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (/^on/i.test(name) || name.toLowerCase() === "style") {
        throw new Error("refusing attribute " + name);
      }
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }

  function replace(el, ...children) {
    clear(el);
    append(el, children);
    return el;
  }

  function button(label, attrs, onClick) {
    const b = h("button", Object.assign({ type: "button" }, attrs), label);
    b.addEventListener("click", onClick);
    return b;
  }

  function link(href, text, attrs) {
    return h("a", Object.assign({ href: href }, attrs), text);
  }

  // Ids are UUIDv7: their first digits are a timestamp, shared by ids made together,
  // so the short form is their random tail.
  function short(id) {
    return id ? "…" + String(id).slice(-8) : "—";
  }

  function text(value) {
    if (value === null || value === undefined || value === "") return "—";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function when(iso) {
    if (!iso) return h("span", { class: "muted" }, "—");
    const date = new Date(iso);
    if (isNaN(date.getTime())) return h("span", null, String(iso));
    return h("time", { datetime: iso, title: iso }, date.toLocaleString() + " (" + ago(date) + ")");
  }

  function ago(date) {
    const seconds = Math.round((Date.now() - date.getTime()) / 1000);
    const future = seconds < 0;
    const s = Math.abs(seconds);
    const span = s < 90 ? s + " s" : s < 5400 ? Math.round(s / 60) + " min"
      : s < 172800 ? Math.round(s / 3600) + " h" : Math.round(s / 86400) + " d";
    return future ? "in " + span : span + " ago";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    if (seconds < 3600) return (seconds / 60).toFixed(1) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function badge(state) {
    return h("span", { class: "badge state-" + String(state).replace(/[^a-z_]/g, ""), "data-testid": "state" },
      text(state));
  }

  // A monospace viewer for step output: scrolls, keeps long lines, never renders markup.
  // Terminal control sequences (colours, cursor moves) a step may print: shown as
  // nothing rather than as stray characters.
  const ANSI = /\u001b\[[0-9;?]*[ -/]*[@-~]/g;

  function output(content, testid) {
    const raw = content === null || content === undefined ? "" : String(content);
    const body = raw.replace(ANSI, "");
    const stripped = raw.length - body.length;
    const lines = body === "" ? 0 : body.replace(/\n$/, "").split("\n").length;
    const pre = h("pre", { class: "output", "data-testid": testid, tabindex: "0" },
      body === "" ? "(empty)" : body);
    if (body === "") pre.classList.add("empty");
    const wrap = button("Wrap lines", { class: "quiet small" }, () => {
      pre.classList.toggle("wrap");
    });
    const about = lines + (lines === 1 ? " line, " : " lines, ") + body.length + " characters" +
      (stripped ? " (terminal colour codes hidden)" : "");
    return h("div", { class: "viewer" },
      h("div", { class: "viewer-bar" }, h("span", { class: "muted" }, about), wrap),
      pre);
  }

  function table(headers, rows, attrs) {
    return h("table", attrs,
      h("thead", null, h("tr", null, headers.map((x) => h("th", null, x)))),
      h("tbody", null, rows));
  }

  function fields(pairs, attrs) {
    return h("dl", Object.assign({ class: "fields" }, attrs),
      pairs.map(([name, value]) => [h("dt", null, name),
        h("dd", { "data-field": name }, value instanceof Node ? value : text(value))]));
  }

  function errorText(err) {
    return h("p", { class: "error", "data-testid": "error" }, err && err.message ? err.message : String(err));
  }

  // ---------------------------------------------------------------- API client

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  let key = sessionStorage.getItem(KEY_STORAGE);
  let me = null;

  async function api(method, path, options) {
    const opts = options || {};
    const headers = { Authorization: "Bearer " + key, Accept: "application/json" };
    const init = { method: method, headers: headers, signal: opts.signal, cache: "no-store",
      credentials: "omit", referrerPolicy: "no-referrer" };
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    const response = await fetch(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (response.status === 401 && !opts.signingIn) {
      signOut("The server no longer takes this key (HTTP 401): sign in again.");
      throw new ApiError(401, "unauthorized");
    }
    if (!response.ok) {
      const message = body && typeof body.error === "string" ? body.error : response.statusText;
      throw new ApiError(response.status, "HTTP " + response.status + ": " + message);
    }
    return { status: response.status, body: body };
  }

  function can(scope) {
    return !!me && (me.admin || (me.scopes || []).indexOf(scope) >= 0);
  }

  // ---------------------------------------------------------------- views and routing

  const app = document.getElementById("app");
  // Each rendered view gets an AbortController; leaving the view aborts its requests
  // and stops its timers.
  let view = null;

  function newView() {
    if (view) view.abort();
    const controller = new AbortController();
    const timers = [];
    view = {
      signal: controller.signal,
      abort() {
        controller.abort();
        timers.forEach((t) => clearTimeout(t));
      },
      // A hidden tab polls nothing: a refresh due while the tab is hidden waits until
      // it is seen again, so forgotten tabs cost the server nothing.
      later(fn, ms) {
        if (controller.signal.aborted) return;
        const run = () => {
          if (controller.signal.aborted) return;
          if (document.hidden) {
            document.addEventListener("visibilitychange", run,
              { once: true, signal: controller.signal });
            return;
          }
          fn();
        };
        timers.push(setTimeout(run, ms));
      },
      get alive() { return !controller.signal.aborted; },
    };
    return view;
  }

  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, "");
    const [path, query] = raw.split("?");
    const parts = path.split("/").filter((p) => p.length > 0).map(decodeURIComponent);
    return { parts: parts, params: new URLSearchParams(query || "") };
  }

  function route() {
    if (!key) {
      renderSignIn();
      return;
    }
    if (!me) {
      loadMe();
      return;
    }
    const v = newView();
    try {
      // Inside the try: a malformed escape in the address (`#/jobs/%E0`) is a page
      // error, not a dead console.
      const { parts, params } = parseHash();
      const section = parts[0] || "overview";
      markNav(section);
      if (parts[1] !== undefined && !UUID.test(parts[1])) {
        replace(app, h("h1", null, "Not found"), h("p", null, "That is not an id."));
        return;
      }
      if (section === "overview") renderOverview(v);
      else if (section === "jobs" && parts[1]) renderJob(v, parts[1]);
      else if (section === "jobs") renderJobs(v, params);
      else if (section === "projects" && parts[1]) renderProject(v, parts[1]);
      else if (section === "projects") renderProjects(v, params);
      else if (section === "clusters" && me.admin) renderClusters(v);
      else replace(app, h("h1", null, "Not found"), h("p", null, "No such page in the console."));
    } catch (err) {
      replace(app, errorText(err));
    }
  }

  function go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  // ---------------------------------------------------------------- sign-in

  function renderSignIn(message) {
    if (view) view.abort();
    document.getElementById("top").hidden = true;
    const input = h("input", { type: "password", id: "key", autocomplete: "off",
      spellcheck: "false", required: true, placeholder: "capy_live_…", "data-testid": "key-input" });
    const status = h("p", { class: "error", "data-testid": "sign-in-error", role: "alert" }, message || "");
    const form = h("form", { class: "sign-in", "data-testid": "sign-in-form", novalidate: true },
      h("h1", null, "capy console"),
      h("label", { for: "key" }, "API key (organization or admin)"),
      input,
      h("button", { type: "submit", "data-testid": "sign-in" }, "Sign in"),
      status,
      h("p", { class: "muted small" },
        "The key is kept in this tab's session storage only and sent only as the Authorization header."));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const candidate = input.value.trim();
      if (!candidate) {
        status.textContent = "Enter an API key.";
        return;
      }
      status.textContent = "Checking…";
      key = candidate;
      try {
        const { body } = await api("GET", "/v1/me", { signingIn: true });
        sessionStorage.setItem(KEY_STORAGE, candidate);
        input.value = "";
        me = body;
        showIdentity();
        if (!location.hash || location.hash === "#" || location.hash === "#/") go("#/overview");
        else route();
      } catch (err) {
        key = null;
        me = null;
        status.textContent = err.status === 401 ? "This key is not valid (HTTP 401)." : err.message;
      }
    });
    replace(app, form);
    input.focus();
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    key = null;
    me = null;
    clear(document.getElementById("who"));
    clear(document.getElementById("nav"));
    renderSignIn(message);
  }

  async function loadMe() {
    replace(app, h("p", { class: "muted" }, "Signing in…"));
    try {
      const { body } = await api("GET", "/v1/me", { signingIn: true });
      me = body;
      showIdentity();
      route();
    } catch (err) {
      if (err.status === 401) signOut("The stored key was refused: sign in again.");
      else replace(app, errorText(err), button("Retry", null, route));
    }
  }

  function showIdentity() {
    document.getElementById("top").hidden = false;
    const who = document.getElementById("who");
    replace(who,
      me.admin ? h("span", { class: "badge admin", "data-testid": "identity-admin" }, "admin") : null,
      h("span", { "data-testid": "identity-org", title: me.organization_id || "every organization" },
        me.organization_id ? "org " + short(me.organization_id) : "all organizations"),
      h("span", { "data-testid": "identity-project", title: "project" },
        me.project_id ? "project " + short(me.project_id) : "all projects"),
      h("span", { "data-testid": "identity-scopes", title: "scopes" },
        "scopes: " + ((me.scopes || []).join(", ") || "none")));
    who.setAttribute("title", "key " + me.key_id);
    const pages = [["overview", "Overview"], ["jobs", "Jobs"], ["projects", "Projects"]];
    if (me.admin) pages.push(["clusters", "Clusters"]);
    replace(document.getElementById("nav"),
      pages.map(([id, label]) => link("#/" + id, label, { "data-nav": id, "data-testid": "nav-" + id })));
  }

  function markNav(section) {
    for (const a of document.querySelectorAll("#nav a")) {
      a.classList.toggle("current", a.getAttribute("data-nav") === section);
    }
  }

  // ---------------------------------------------------------------- overview

  function renderOverview(v) {
    const body = h("div", { "data-testid": "overview" }, h("p", { class: "muted" }, "Loading…"));
    replace(app, h("h1", null, "Queue overview"), body);
    const load = async () => {
      try {
        const { body: q } = await api("GET", "/v1/queue", { signal: v.signal });
        if (!v.alive) return;
        replace(body, overview(q));
      } catch (err) {
        if (!v.alive) return;
        if (err.status === 404) replace(body, await overviewFallback(v));
        else replace(body, errorText(err));
      }
      v.later(load, 5000);
    };
    load();
  }

  function stat(label, value, testid) {
    return h("div", { class: "stat", "data-testid": testid },
      h("div", { class: "stat-value" }, value), h("div", { class: "stat-label" }, label));
  }

  function overview(q) {
    const hour = q.last_hour || {};
    const rate = typeof hour.failure_rate === "number" ? (hour.failure_rate * 100).toFixed(1) + " %" : "—";
    const byType = (q.by_type || []).map((t) => h("tr", { "data-testid": "type-row" },
      h("td", null, link("#/jobs?type=" + encodeURIComponent(t.type), t.type)),
      h("td", { class: "num" }, text(t.pending)), h("td", { class: "num" }, text(t.claimed)),
      h("td", { class: "num" }, text(t.completed)), h("td", { class: "num" }, text(t.failed)),
      h("td", { class: "num" }, text(t.cancelled))));
    let workers;
    if (q.workers === null || q.workers === undefined) {
      workers = h("p", { class: "muted" }, "Workers are listed for admin keys.");
    } else if (q.workers.length === 0) {
      workers = h("p", { class: "muted" }, "No worker seen recently.");
    } else {
      workers = table(["Worker", "In flight", "Jobs", "Last seen"], q.workers.map((w) => h("tr", { "data-testid": "worker-row" },
        h("td", null, text(w.worker)), h("td", { class: "num" }, text(w.in_flight)),
        h("td", null, (w.jobs || []).map((id) => [link("#/jobs/" + encodeURIComponent(id), short(id), { class: "mono" }), " "])),
        h("td", null, when(w.last_seen_at)))));
    }
    return [
      h("p", { class: "muted" }, "Scope: " + text(q.scope)),
      h("div", { class: "stats" },
        stat("pending", text(q.pending), "depth-pending"),
        stat("claimed (running)", text(q.claimed), "depth-claimed"),
        stat("oldest pending", duration(q.oldest_pending_age_seconds), "oldest-pending"),
        stat("completed, last hour", text(hour.completed), "hour-completed"),
        stat("failed, last hour", text(hour.failed), "hour-failed"),
        stat("failure rate", rate, "failure-rate")),
      h("h2", null, "Last hour"),
      chart(hour),
      h("h2", null, "By type"),
      byType.length ? table(["Type", "Pending", "Claimed", "Completed (1 h)", "Failed (1 h)", "Cancelled (1 h)"], byType,
        { "data-testid": "by-type" }) : h("p", { class: "muted" }, "No jobs."),
      h("h2", null, "Workers"),
      workers,
    ];
  }

  // Stacked bars per bucket (completed, failed, cancelled), drawn with DOM APIs.
  function chart(hour) {
    const buckets = hour.buckets || [];
    if (buckets.length === 0) return h("p", { class: "muted" }, "No finished jobs in the last hour.");
    const width = 640, height = 160, left = 36, bottom = 22, top = 8;
    const max = Math.max(1, ...buckets.map((b) => (b.completed || 0) + (b.failed || 0) + (b.cancelled || 0)));
    const slot = (width - left) / buckets.length;
    const scale = (height - bottom - top) / max;
    const root = svg("svg", { viewBox: "0 0 " + width + " " + height, class: "chart", role: "img",
      "aria-label": "Jobs finished per " + Math.round((hour.bucket_seconds || 300) / 60) + " minutes over the last hour",
      "data-testid": "chart" });
    root.appendChild(svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }));
    root.appendChild(svg("text", { x: left - 4, y: top + 8, class: "tick", "text-anchor": "end" }, String(max)));
    root.appendChild(svg("text", { x: left - 4, y: height - bottom, class: "tick", "text-anchor": "end" }, "0"));
    buckets.forEach((b, i) => {
      let y = height - bottom;
      const x = left + i * slot + 2;
      for (const part of ["completed", "failed", "cancelled"]) {
        const n = b[part] || 0;
        if (n <= 0) continue;
        const hgt = n * scale;
        y -= hgt;
        const rect = svg("rect", { x: x.toFixed(1), y: y.toFixed(1), width: Math.max(1, slot - 4).toFixed(1),
          height: hgt.toFixed(1), class: "bar " + part });
        rect.appendChild(svg("title", null, part + ": " + n + " (from " + b.start + ")"));
        root.appendChild(rect);
      }
      if (i % Math.max(1, Math.ceil(buckets.length / 6)) === 0) {
        const d = new Date(b.start);
        const label = isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
        root.appendChild(svg("text", { x: (x + slot / 2).toFixed(1), y: height - 6, class: "tick", "text-anchor": "middle" }, label));
      }
    });
    const legend = h("p", { class: "legend" },
      h("span", { class: "key completed" }), "completed ",
      h("span", { class: "key failed" }), "failed ",
      h("span", { class: "key cancelled" }), "cancelled");
    return h("figure", { class: "chart-box" }, root, legend);
  }

  // Without GET /v1/queue (an older server): the depth from the jobs list, capped.
  async function overviewFallback(v) {
    const counts = [];
    for (const state of ["pending", "claimed", "failed", "cancelled"]) {
      try {
        const { body } = await api("GET", "/v1/jobs?limit=200&state=" + state, { signal: v.signal });
        counts.push(stat(state, body.jobs.length + (body.next_cursor ? "+" : ""), "depth-" + state));
      } catch (err) {
        counts.push(stat(state, "?", "depth-" + state));
      }
    }
    return [
      h("p", { class: "muted", "data-testid": "queue-missing" },
        "This server has no queue summary (GET /v1/queue answered 404); counts below come from the jobs list."),
      h("div", { class: "stats" }, counts),
      h("h2", null, "Latest jobs"),
      await latestJobs(v),
    ];
  }

  async function latestJobs(v) {
    try {
      const { body } = await api("GET", "/v1/jobs?limit=10", { signal: v.signal });
      return jobsTable(body.jobs, "latest-jobs");
    } catch (err) {
      return errorText(err);
    }
  }

  // ---------------------------------------------------------------- jobs list

  function jobsHash(filter, cursor) {
    const p = new URLSearchParams();
    for (const name of ["state", "type", "project_id"]) if (filter[name]) p.set(name, filter[name]);
    if (cursor) p.set("cursor", cursor);
    const q = p.toString();
    return "#/jobs" + (q ? "?" + q : "");
  }

  // Cursors of the pages before this one, so "Newer" can step back.
  let jobsHistory = [];

  function renderJobs(v, params) {
    const filter = { state: params.get("state") || "", type: params.get("type") || "",
      project_id: params.get("project_id") || "" };
    const cursor = params.get("cursor") || "";
    if (!cursor) jobsHistory = [];

    const stateSelect = h("select", { "data-testid": "filter-state", "aria-label": "state" },
      h("option", { value: "" }, "any state"),
      JOB_STATES.map((s) => h("option", { value: s, selected: s === filter.state }, s)));
    const typeSelect = h("select", { "data-testid": "filter-type", "aria-label": "type" },
      h("option", { value: "" }, "any type"),
      JOB_TYPES.map((t) => h("option", { value: t, selected: t === filter.type }, t)));
    const projectInput = h("input", { type: "text", value: filter.project_id, placeholder: "project id",
      "data-testid": "filter-project", "aria-label": "project id", size: "38", spellcheck: "false" });
    const apply = () => {
      jobsHistory = [];
      go(jobsHash({ state: stateSelect.value, type: typeSelect.value, project_id: projectInput.value.trim() }, ""));
    };
    stateSelect.addEventListener("change", apply);
    typeSelect.addEventListener("change", apply);
    const filters = h("form", { class: "filters", "data-testid": "job-filters" },
      stateSelect, typeSelect, projectInput, h("button", { type: "submit" }, "Filter"),
      button("Clear", { class: "quiet" }, () => { jobsHistory = []; go("#/jobs"); }));
    filters.addEventListener("submit", (e) => { e.preventDefault(); apply(); });

    const list = h("div", { "data-testid": "jobs-list" }, h("p", { class: "muted" }, "Loading…"));
    const status = h("p", { class: "muted small", "data-testid": "jobs-status" });
    const newer = button("Newer", { "data-testid": "jobs-newer", disabled: !cursor }, () => {
      const previous = jobsHistory.pop();
      go(jobsHash(filter, previous || ""));
    });
    const older = button("Older", { "data-testid": "jobs-older", disabled: true }, () => {});
    const pager = h("div", { class: "pager" }, newer, older);
    replace(app, h("h1", null, "Jobs"), filters, list, pager, status);

    let next = null;
    older.addEventListener("click", () => {
      if (!next) return;
      jobsHistory.push(cursor);
      go(jobsHash(filter, next));
    });

    const query = new URLSearchParams({ limit: "50" });
    for (const name of ["state", "type", "project_id"]) if (filter[name]) query.set(name, filter[name]);
    if (cursor) query.set("cursor", cursor);

    const load = async () => {
      try {
        const { body } = await api("GET", "/v1/jobs?" + query.toString(), { signal: v.signal });
        if (!v.alive) return;
        next = body.next_cursor;
        older.disabled = !next;
        replace(list, jobsTable(body.jobs));
        status.textContent = "Refreshed " + new Date().toLocaleTimeString() + " · every 2 s";
      } catch (err) {
        if (!v.alive) return;
        replace(list, errorText(err));
      }
      v.later(load, 2000);
    };
    load();
  }

  function jobsTable(jobs, testid) {
    if (!jobs || jobs.length === 0) return h("p", { class: "muted", "data-testid": "jobs-empty" }, "No jobs.");
    return table(["Job", "Type", "State", "Project", "Attempts", "Created", "Updated"],
      jobs.map((j) => h("tr", { "data-testid": "job-row", "data-job-id": j.id, "data-state": j.state },
        h("td", null, link("#/jobs/" + encodeURIComponent(j.id), short(j.id), { class: "mono" })),
        h("td", null, text(j.type)),
        h("td", null, badge(j.state)),
        h("td", null, j.project_id ? link("#/projects/" + encodeURIComponent(j.project_id), short(j.project_id), { class: "mono" }) : "—"),
        h("td", { class: "num" }, j.attempts + " / " + j.max_attempts),
        h("td", null, when(j.created_at)),
        h("td", null, when(j.updated_at)))),
      { class: "jobs", "data-testid": testid || "jobs-table" });
  }

  // ---------------------------------------------------------------- one job

  function renderJob(v, id) {
    const head = h("div", { class: "job-head" });
    const actions = h("div", { class: "actions", "data-testid": "job-actions" });
    const actionError = h("p", { class: "error", "data-testid": "action-error", role: "alert" });
    const details = h("div", { "data-testid": "job-fields" }, h("p", { class: "muted" }, "Loading…"));
    const attemptsBox = h("div", { "data-testid": "attempts" });
    const follow = h("p", { class: "muted small", "data-testid": "follow-status" });
    replace(app, h("p", null, link("#/jobs", "← Jobs")), head, actions, actionError, follow, details,
      h("h2", null, "Attempts"), attemptsBox);

    let job = null;
    let attemptsKey = null;

    const show = (fresh) => {
      job = fresh;
      replace(head, h("h1", null, "Job ", h("span", { class: "mono", "data-testid": "job-id" }, job.id)),
        h("p", null, h("span", { "data-testid": "job-type" }, text(job.type)), " ",
          h("span", { "data-testid": "job-state" }, badge(job.state))));
      // After Cancel or Retry the page follows the job again at once.
      replace(actions, jobActions(job, (changed) => { show(changed); loop(false); }, actionError));
      replace(details, jobFields(job));
      const newKey = [job.state, job.attempts, job.updated_at].join("|");
      if (newKey !== attemptsKey) {
        attemptsKey = newKey;
        loadAttempts(v, job, attemptsBox);
      }
    };

    // A live job is long-polled (`?wait=20`); a finished one is only looked at every
    // 10 s (a retry from elsewhere shows up), since a long-poll costs the server a
    // query every 50 ms. Each call of `loop` supersedes the one before.
    let generation = 0;
    const isFinal = (j) => !!j && FINAL_STATES.indexOf(j.state) >= 0;
    const loop = async (first) => {
      const mine = ++generation;
      const current = () => v.alive && mine === generation;
      try {
        const wait = first || isFinal(job) ? "" : "?wait=20";
        const path = "/v1/jobs/" + encodeURIComponent(id) + wait;
        const { body } = await api("GET", path, { signal: v.signal });
        if (!current()) return;
        show(body.job);
        const final = isFinal(body.job);
        follow.textContent = final
          ? "Final state; looked at again every 10 s, so a retry shows up."
          : "Following this job live…";
        v.later(() => { if (mine === generation) loop(false); }, final ? 10000 : 50);
      } catch (err) {
        if (!current()) return;
        if (err.status === 404) {
          replace(details, errorText(err));
          return;
        }
        follow.textContent = "Lost contact (" + err.message + "); trying again…";
        v.later(() => { if (mine === generation) loop(false); }, 2000);
      }
    };
    loop(true);
  }

  function jobActions(job, show, errorBox) {
    if (!can("write")) return [];
    const act = (verb) => async (event) => {
      const b = event.currentTarget;
      b.disabled = true;
      errorBox.textContent = "";
      try {
        const { body } = await api("POST", "/v1/jobs/" + encodeURIComponent(job.id) + "/" + verb);
        show(body.job);
      } catch (err) {
        errorBox.textContent = err.message;
        b.disabled = false;
      }
    };
    const out = [];
    if (job.state === "pending" || job.state === "claimed") {
      out.push(button(job.cancel_requested_at ? "Cancel requested…" : "Cancel",
        { class: "danger", "data-testid": "cancel-job", disabled: !!job.cancel_requested_at }, act("cancel")));
    }
    if (job.state === "failed" || job.state === "cancelled") {
      out.push(button("Retry", { "data-testid": "retry-job" }, act("retry")));
    }
    return out;
  }

  function jobFields(job) {
    const pairs = [
      ["id", h("span", { class: "mono" }, job.id)],
      ["type", job.type],
      ["state", job.state],
      ["organization", job.organization_id],
      ["project", job.project_id ? link("#/projects/" + encodeURIComponent(job.project_id), job.project_id, { class: "mono" }) : null],
      ["cluster", job.cluster_id],
      ["preview database", job.preview_database_id],
      ["attempts", job.attempts + " of " + job.max_attempts],
      ["run at", when(job.run_at)],
      ["claimed at", when(job.claimed_at)],
      ["claimed by", job.claimed_by],
      ["started at", when(job.started_at)],
      ["completed at", when(job.completed_at)],
      ["cancel requested at", when(job.cancel_requested_at)],
      ["error", job.error],
      ["last exit code", job.last_exit_code],
      ["retry classification", job.retry_classification],
      ["locked resource", job.locked_resource],
      ["created at", when(job.created_at)],
      ["updated at", when(job.updated_at)],
    ];
    // Fields a newer server adds are shown too, as text.
    const known = ["id", "type", "state", "organization_id", "project_id", "cluster_id", "preview_database_id",
      "attempts", "max_attempts", "run_at", "claimed_at", "claimed_by", "started_at", "completed_at",
      "cancel_requested_at", "error", "last_exit_code", "retry_classification", "locked_resource", "created_at",
      "updated_at", "args", "last_stdout", "last_stderr"];
    for (const [name, value] of Object.entries(job)) if (known.indexOf(name) < 0) pairs.push([name, value]);
    return [
      fields(pairs, { class: "fields wide" }),
      h("details", { class: "more" },
        h("summary", null, "Arguments, and the last attempt's stdout and stderr"),
        h("h4", null, "arguments"),
        h("pre", { class: "output short", "data-testid": "job-args" }, JSON.stringify(job.args, null, 2)),
        h("h4", null, "last stdout"), output(job.last_stdout, "job-stdout"),
        h("h4", null, "last stderr"), output(job.last_stderr, "job-stderr")),
    ];
  }

  async function loadAttempts(v, job, box) {
    const id = job.id;
    // The attempt under way is not in the list until it ends: shown from the job.
    const running = job.state === "claimed"
      ? h("section", { class: "attempt running", "data-testid": "attempt-running" },
        h("h3", null, "Attempt " + job.attempts + " ", badge("running")),
        fields([
          ["worker", job.claimed_by],
          ["started at", when(job.started_at || job.claimed_at)],
          ["cancel requested at", job.cancel_requested_at ? when(job.cancel_requested_at) : null],
        ], { class: "fields wide" }),
        h("p", { class: "muted small" }, "Its stdout and stderr are shown when it ends."))
      : null;
    try {
      const all = [];
      let cursor = "";
      for (let page = 0; page < 10; page++) {
        const q = "?limit=200" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
        const { body } = await api("GET", "/v1/jobs/" + encodeURIComponent(id) + "/attempts" + q, { signal: v.signal });
        all.push(...body.attempts);
        if (!body.next_cursor) break;
        cursor = body.next_cursor;
      }
      if (!v.alive) return;
      if (all.length === 0) {
        replace(box, running, h("p", { class: "muted", "data-testid": "no-attempts" }, "No finished attempt yet."));
        return;
      }
      replace(box, running, all.map((a) => h("section", { class: "attempt", "data-testid": "attempt", "data-attempt": a.attempt },
        h("h3", null, "Attempt " + a.attempt, " ", a.classification ? badge(a.classification) : null),
        fields([
          ["worker", a.worker],
          ["started at", when(a.started_at)],
          ["finished at", when(a.finished_at)],
          ["exit code", a.exit_code],
          ["classification", a.classification],
          ["error", a.error],
        ], { class: "fields wide" }),
        h("h4", null, "stdout"), output(a.stdout, "attempt-stdout"),
        h("h4", null, "stderr"), output(a.stderr, "attempt-stderr"))).reverse());
    } catch (err) {
      if (v.alive) replace(box, errorText(err));
    }
  }

  // ---------------------------------------------------------------- projects

  let projectsHistory = [];

  function renderProjects(v, params) {
    const cursor = params.get("cursor") || "";
    if (!cursor) projectsHistory = [];
    const list = h("div", { "data-testid": "projects-list" }, h("p", { class: "muted" }, "Loading…"));
    const newer = button("Newer", { disabled: !cursor }, () => go("#/projects" + pageQuery(projectsHistory.pop())));
    const older = button("Older", { disabled: true, "data-testid": "projects-older" }, () => {});
    replace(app, h("h1", null, "Projects"), list, h("div", { class: "pager" }, newer, older));
    const q = "/v1/projects?limit=50" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
    api("GET", q, { signal: v.signal }).then(({ body }) => {
      if (!v.alive) return;
      const next = body.next_cursor;
      older.disabled = !next;
      older.addEventListener("click", () => { projectsHistory.push(cursor); go("#/projects" + pageQuery(next)); });
      if (body.projects.length === 0) {
        replace(list, h("p", { class: "muted" }, "No projects."));
        return;
      }
      replace(list, table(["Name", "Engine", "State", "Plan", "Region", "Created"],
        body.projects.map((p) => h("tr", { "data-testid": "project-row", "data-project-id": p.id },
          h("td", null, link("#/projects/" + encodeURIComponent(p.id), p.name)),
          h("td", null, text(p.engine)), h("td", null, badge(p.state)), h("td", null, text(p.plan)),
          h("td", null, text(p.region)), h("td", null, when(p.created_at))))));
    }).catch((err) => { if (v.alive) replace(list, errorText(err)); });
  }

  function pageQuery(cursor) {
    return cursor ? "?cursor=" + encodeURIComponent(cursor) : "";
  }

  function renderProject(v, id) {
    const base = "/v1/projects/" + encodeURIComponent(id);
    const head = h("div", null, h("p", { class: "muted" }, "Loading…"));
    const sections = {
      settings: h("div"),
      credentials: h("div", { "data-testid": "credentials" }),
      extensions: h("div", { "data-testid": "extensions" }, h("p", { class: "muted" }, "Loading…")),
      jobs: h("div", { "data-testid": "project-jobs" }, h("p", { class: "muted" }, "Loading…")),
      previews: h("div", { "data-testid": "previews" }, h("p", { class: "muted" }, "Loading…")),
      backups: h("div", { "data-testid": "backups" }, h("p", { class: "muted" }, "Loading…")),
    };
    replace(app, h("p", null, link("#/projects", "← Projects")), head, sections.settings,
      h("h2", null, "Connection"), sections.credentials,
      h("h2", null, "Extensions"), sections.extensions,
      h("h2", null, "Jobs"), sections.jobs,
      h("h2", null, "Previews"), sections.previews,
      h("h2", null, "Backups"), sections.backups);

    const loadProject = async () => {
      try {
        const { body } = await api("GET", base, { signal: v.signal });
        if (!v.alive) return;
        const p = body.project;
        replace(head, h("h1", { "data-testid": "project-name" }, p.name),
          h("p", null, h("span", { "data-testid": "project-state" }, badge(p.state)), " ",
            h("span", { class: "muted" }, text(p.engine) + " · " + text(p.plan) + " · " + text(p.region))));
        replace(sections.settings, fields([
          ["id", h("span", { class: "mono" }, p.id)],
          ["slug", p.slug], ["engine", p.engine], ["state", p.state], ["plan", p.plan],
          ["region", p.region], ["environment", p.environment], ["cluster", p.cluster_id],
          ["database", p.database_name], ["role", p.role_name],
          ["host", p.public_host + ":" + p.direct_port], ["pooled", p.pooled_host + ":" + p.pooled_port],
          ["ssl mode", p.ssl_mode], ["max connections", p.max_connections],
          ["statement timeout", p.statement_timeout], ["idle transaction timeout", p.idle_transaction_timeout],
          ["storage limit (bytes)", p.storage_limit_bytes], ["last error", p.last_error],
          ["latest job", p.latest_job_id ? link("#/jobs/" + encodeURIComponent(p.latest_job_id), p.latest_job_id, { class: "mono" }) : null],
          ["created at", when(p.created_at)], ["updated at", when(p.updated_at)],
        ], { class: "fields wide", "data-testid": "project-fields" }));
      } catch (err) {
        if (v.alive) replace(head, errorText(err));
      }
      v.later(loadProject, 5000);
    };
    loadProject();

    // Credentials: only for keys with credentials:read, fetched on a click only.
    if (can("credentials:read")) {
      const box = h("div");
      const showBtn = button("Show connection string", { "data-testid": "show-credentials" }, async () => {
        showBtn.disabled = true;
        try {
          const { body } = await api("GET", base + "/credentials", { signal: v.signal });
          replace(box, fields([
            ["connection string", h("code", { class: "secret", "data-testid": "connection-string" }, body.connection_string)],
            ["pooled", body.pooled_connection_string ? h("code", { class: "secret" }, body.pooled_connection_string) : null],
            ["username", body.username],
          ]), button("Hide", { "data-testid": "hide-credentials" }, () => { clear(box); showBtn.disabled = false; }));
        } catch (err) {
          replace(box, errorText(err));
          showBtn.disabled = false;
        }
      });
      replace(sections.credentials, showBtn, box);
    } else {
      replace(sections.credentials, h("p", { class: "muted" }, "This key lacks the credentials:read scope."));
    }

    const optional = (path, key, box, render) => {
      api("GET", base + path, { signal: v.signal }).then(({ body }) => {
        if (!v.alive) return;
        const rows = body[key] || [];
        replace(box, rows.length ? render(rows) : h("p", { class: "muted" }, "None."));
      }).catch((err) => {
        if (!v.alive) return;
        if (err.status === 422 || err.status === 404) {
          replace(box, h("p", { class: "muted" }, "Not available for this project (" + err.message + ")."));
        } else replace(box, errorText(err));
      });
    };
    optional("/extensions?limit=200", "extensions", sections.extensions, (rows) => {
      const enabled = rows.filter((e) => e.enabled);
      return [h("p", { class: "muted" }, enabled.length + " enabled of " + rows.length + " available."),
        table(["Name", "Enabled", "Installed", "Default", "Allowed"], rows.filter((e) => e.enabled || e.allowed).sort((a, b) => Number(b.enabled) - Number(a.enabled)).map((e) =>
          h("tr", null, h("td", null, text(e.name)), h("td", null, e.enabled ? "yes" : "no"),
            h("td", null, text(e.installed_version)), h("td", null, text(e.default_version)),
            h("td", null, e.allowed ? "yes" : text(e.reason)))))];
    });
    optional("/preview-databases?limit=50", "preview_databases", sections.previews, (rows) =>
      table(["Name", "Mode", "State", "Database", "Expires"], rows.map((p) => h("tr", null,
        h("td", null, text(p.name)), h("td", null, text(p.mode)), h("td", null, badge(p.state)),
        h("td", null, text(p.database_name)), h("td", null, when(p.ttl_expires_at))))));
    optional("/backups?limit=50", "backups", sections.backups, (rows) =>
      table(["Created", "Label", "State", "Verified", "Size", "Expires", "Job"], rows.map((b) => h("tr", null,
        h("td", null, when(b.created_at)), h("td", null, text(b.label)), h("td", null, badge(b.state)),
        h("td", null, text(b.verification_state)), h("td", { class: "num" }, text(b.size_bytes)),
        h("td", null, when(b.expires_at)),
        h("td", null, b.job_id ? link("#/jobs/" + encodeURIComponent(b.job_id), short(b.job_id), { class: "mono" }) : "—")))));

    const loadJobs = async () => {
      try {
        const { body } = await api("GET", "/v1/jobs?limit=20&project_id=" + encodeURIComponent(id), { signal: v.signal });
        if (!v.alive) return;
        replace(sections.jobs, jobsTable(body.jobs, "project-jobs-table"),
          body.next_cursor ? link("#/jobs?project_id=" + encodeURIComponent(id), "All of this project's jobs →") : null);
      } catch (err) {
        if (v.alive) replace(sections.jobs, errorText(err));
      }
      v.later(loadJobs, 3000);
    };
    loadJobs();
  }

  // ---------------------------------------------------------------- clusters (admin)

  function renderClusters(v) {
    const list = h("div", { "data-testid": "clusters-list" }, h("p", { class: "muted" }, "Loading…"));
    replace(app, h("h1", null, "Clusters"), list);
    api("GET", "/v1/clusters?limit=200", { signal: v.signal }).then(({ body }) => {
      if (!v.alive) return;
      if (body.clusters.length === 0) {
        replace(list, h("p", { class: "muted" }, "No clusters registered."));
        return;
      }
      replace(list, body.clusters.map((c) => {
        const report = h("div", { class: "report", "data-testid": "access-report" });
        const check = button("Check access", { "data-testid": "check-access" }, async () => {
          check.disabled = true;
          replace(report, h("p", { class: "muted" }, "Checking…"));
          try {
            const { body: r } = await api("POST", "/v1/clusters/" + encodeURIComponent(c.id) + "/check-access", { signal: v.signal });
            replace(report, accessReport(r.access));
          } catch (err) {
            replace(report, errorText(err));
          }
          check.disabled = false;
        });
        return h("section", { class: "cluster", "data-testid": "cluster", "data-cluster-id": c.id },
          h("h2", null, c.name, " ", h("span", { class: "muted" }, text(c.engine) + " · " + text(c.region))),
          fields([
            ["id", h("span", { class: "mono" }, c.id)],
            ["admin URL", c.admin_url], ["public host", c.public_host + ":" + c.direct_port],
            ["pooled", (c.pooled_host || c.public_host) + ":" + c.pooled_port],
            ["pooler auth user", c.pooler_auth_user], ["ssl mode", c.ssl_mode],
            ["projects", c.project_count + (c.max_projects ? " of " + c.max_projects : "")],
            ["allowed extensions", (c.allowed_extensions || []).join(", ")],
            ["last checked", when(c.last_checked_at)],
          ], { class: "fields wide" }),
          check, report);
      }));
    }).catch((err) => { if (v.alive) replace(list, errorText(err)); });
  }

  function accessReport(r) {
    const pairs = Object.entries(r).map(([name, value]) => {
      if (name === "checked_at") return [name, when(value)];
      if (Array.isArray(value)) return [name, value.length ? value.join(", ") : "none"];
      if (typeof value === "boolean") return [name, value ? "yes" : "no"];
      return [name, value];
    });
    return [h("p", null, r.reachable ? badge("reachable") : badge("unreachable")), fields(pairs)];
  }

  // ---------------------------------------------------------------- start

  document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", route);
  route();
})();
