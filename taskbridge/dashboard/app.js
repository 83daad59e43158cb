// The taskbridge dashboard: lists task calls live, shows one call's details with its progress
// (pushed by Server-Sent Events), and cancels or re-runs calls. Plain ES2020, no dependencies.
// Every value from the API goes into the page as text (textContent), never as markup.

const STATES = ["queued", "running", "retrying", "succeeded", "failed", "cancelled"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const CANCELLABLE = new Set(["queued", "running", "retrying"]);
const RETRYABLE = new Set(["failed", "cancelled"]);
const PAGE = 50;
const MAX_PAGE = 500; // the largest page the API answers
const REFRESH_MS = 1000;

// The API is served next to the page, so it is found relative to the page's own address: the
// dashboard works under any mount point or root_path.
const API = new URL("api/tasks", document.baseURI);

const view = {
  filters: { state: "", task: "", backend: "" },
  items: [],
  next: null,
  generation: 0, // bumped when the filters change: answers for older filters are dropped
  loadingMore: false,
  rows: new Map(), // call id -> its <tr>, reused so focus and selection survive refreshes
  taskRows: new Map(), // task name -> its <tr> in the per-task table
  backends: new Set(),
  tasks: new Set(),
  retryOf: new Map(), // call id -> the id it re-runs, as the list or a retry answered it
  selected: null,
  detail: null,
  stream: null,
  poll: null,
};

// -- helpers ------------------------------------------------------------------------------------

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children); // strings become text nodes
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function knownState(state) {
  return STATES.includes(state) ? state : "unknown";
}

function badge(state, testid) {
  return el("span", { class: `badge state-${knownState(state)}`, "data-testid": testid }, state);
}

function setBadge(node, state) {
  node.className = `badge state-${knownState(state)}`;
  setText(node, state || "");
}

function percent(progress) {
  return `${Math.round(progress * 100)}%`;
}

function setBar(bar, progress) {
  const fill = bar.firstElementChild;
  if (progress === null || progress === undefined) {
    bar.removeAttribute("aria-valuenow");
    bar.classList.add("none");
    fill.style.width = "0%";
  } else {
    const value = Math.round(progress * 100);
    bar.setAttribute("aria-valuenow", String(value));
    bar.classList.remove("none");
    fill.style.width = `${value}%`;
  }
}

const fullTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const clock = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto", style: "narrow" });

function ago(date) {
  const seconds = Math.round((date.getTime() - Date.now()) / 1000);
  const size = Math.abs(seconds);
  if (size < 60) return relative.format(seconds, "second");
  if (size < 3600) return relative.format(Math.round(seconds / 60), "minute");
  if (size < 86400) return relative.format(Math.round(seconds / 3600), "hour");
  return relative.format(Math.round(seconds / 86400), "day");
}

// Today's times without the date; the full date and time in the tooltip.
function when(date) {
  const today = date.toDateString() === new Date().toDateString();
  return today ? clock.format(date) : fullTime.format(date);
}

function timeCell(iso) {
  if (!iso) return el("span", { class: "none" }, "—");
  const date = new Date(iso);
  return el("time", { datetime: iso, title: fullTime.format(date) }, ago(date));
}

function duration(from, to) {
  const ms = Date.parse(to) - Date.parse(from);
  if (ms < 1000) return `${Math.round(ms)}\u00a0ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)}\u00a0s`;
  return `${Math.floor(ms / 60000)}\u00a0min ${Math.round((ms % 60000) / 1000)}\u00a0s`;
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

// A value shown as JSON, or as a muted word when there is none to show.
function setValue(node, text, none) {
  node.classList.toggle("none", text === null);
  setText(node, text === null ? none : text);
}

function say(testid, text, isError = false) {
  const node = $(testid);
  node.classList.toggle("error", isError);
  setText(node, text);
}

// -- the API ------------------------------------------------------------------------------------

async function request(method, url) {
  const response = await fetch(url, {
    method,
    headers: { Accept: "application/json" },
    credentials: "same-origin",
    cache: "no-store",
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`.trim();
    if (body && typeof body.detail === "string") detail = body.detail;
    else if (body && body.detail) detail = JSON.stringify(body.detail);
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return body;
}

function listURL(limit, cursor) {
  const url = new URL(API);
  for (const [name, value] of Object.entries(view.filters)) {
    if (value) url.searchParams.set(name, value);
  }
  url.searchParams.set("limit", String(limit));
  if (cursor) url.searchParams.set("cursor", cursor);
  return url;
}

function callURL(id, tail = "") {
  return `${API.href}/${encodeURIComponent(id)}${tail}`;
}

// -- the address bar keeps the filters and the open call, so a reload shows the same view -------

function readAddress() {
  const params = new URLSearchParams(window.location.search);
  for (const name of Object.keys(view.filters)) view.filters[name] = params.get(name) || "";
  return params.get("call");
}

function saveAddress() {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(view.filters)) if (value) params.set(name, value);
  if (view.selected) params.set("call", view.selected);
  const query = params.toString();
  const address = `${window.location.pathname}${query ? `?${query}` : ""}`;
  window.history.replaceState(null, "", address);
}

// -- counts -------------------------------------------------------------------------------------

function buildCounts() {
  const box = $("state-counts");
  for (const state of ["", ...STATES]) {
    const name = state || "all";
    box.append(
      el(
        "button",
        {
          type: "button",
          class: `count state-${state || "all"}`,
          "data-state": state,
          "data-testid": `state-count-${name}`,
          "aria-pressed": "false",
        },
        el("span", { class: "label" }, state || "all calls"),
        el("span", { class: "number", "data-testid": `count-${name}` }, "–"),
      ),
    );
  }
  box.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-state]");
    if (!button) return;
    const state = button.dataset.state;
    setFilters({ state: state && state === view.filters.state ? "" : state });
  });
  const head = $("task-stats").tHead.rows[0];
  head.append(el("th", { scope: "col" }, "Task"));
  for (const state of STATES) head.append(el("th", { scope: "col", class: "num" }, state));
  head.append(el("th", { scope: "col", class: "num" }, "total"));
  $("task-stats").tBodies[0].addEventListener("click", (event) => {
    const button = event.target.closest("button[data-task]");
    if (!button) return;
    const task = button.dataset.task;
    setFilters({ task: task === view.filters.task ? "" : task });
  });
}

function renderCounts(stats) {
  setText($("count-all"), String(stats.total));
  for (const state of STATES) setText($(`count-${state}`), String(stats.states[state] || 0));
  for (const button of $("state-counts").querySelectorAll("button[data-state]")) {
    button.setAttribute("aria-pressed", String(button.dataset.state === view.filters.state));
  }
  const body = $("task-stats").tBodies[0];
  const names = Object.keys(stats.tasks).sort();
  for (const [name, row] of view.taskRows) {
    if (!(name in stats.tasks)) {
      row.remove();
      view.taskRows.delete(name);
    }
  }
  names.forEach((name, index) => {
    let row = view.taskRows.get(name);
    if (!row) {
      row = el(
        "tr",
        { "data-testid": "task-stats-row", "data-task": name },
        el(
          "th",
          { scope: "row" },
          el("button", { type: "button", class: "link", "data-task": name }, name),
        ),
      );
      for (const state of STATES) row.append(el("td", { class: "num", "data-state": state }));
      row.append(el("td", { class: "num total" }));
      view.taskRows.set(name, row);
    }
    const counts = stats.tasks[name];
    let total = 0;
    STATES.forEach((state, column) => {
      const n = counts[state] || 0;
      total += n;
      const cell = row.cells[column + 1];
      setText(cell, String(n));
      cell.classList.toggle("zero", n === 0);
    });
    setText(row.cells[STATES.length + 1], String(total));
    row.querySelector("button").setAttribute("aria-pressed", String(name === view.filters.task));
    if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
  });
  for (const name of names) view.tasks.add(name);
  fillOptions($("filter-task"), view.tasks, view.filters.task);
}

function fillOptions(select, values, current) {
  const wanted = ["", ...[...values, ...(current ? [current] : [])].filter(Boolean)];
  const unique = [...new Set(wanted)].sort();
  const have = [...select.options].map((option) => option.value);
  if (have.join("\n") !== unique.join("\n")) {
    select.replaceChildren(...unique.map((value) => el("option", { value }, value || "any")));
  }
  select.value = current;
}

// -- the list -----------------------------------------------------------------------------------

function makeRow(id) {
  const open = el("button", { type: "button", class: "link task", "data-testid": "row-open" });
  const first = el(
    "td",
    {},
    open,
    el("span", { class: "retry-mark", title: "", hidden: true }, "↻ retry"),
    el("code", { class: "short-id" }, id.slice(0, 8)),
  );
  const row = el("tr", { "data-testid": "task-row", "data-id": id }, first);
  for (let i = 0; i < 7; i += 1) row.append(el("td"));
  row.cells[2].append(el("div", { class: "bar" }, el("span")), el("span", { class: "pct" }));
  row.cells[7].className = "num";
  return row;
}

function fillRow(row, item) {
  const [name, state, progress, enqueued, started, finished, backend, attempts] = row.cells;
  setText(name.querySelector("button"), item.task_name || "(unknown task)");
  const mark = name.querySelector(".retry-mark");
  mark.hidden = !item.retry_of;
  mark.title = item.retry_of ? `re-run of ${item.retry_of}` : "";
  const current = state.firstElementChild;
  if (!current || current.textContent !== item.state) {
    state.replaceChildren(badge(item.state, "row-state"));
  }
  setBar(progress.querySelector(".bar"), item.progress);
  setText(progress.querySelector(".pct"), item.progress === null ? "" : percent(item.progress));
  progress.querySelector(".bar").hidden = item.progress === null;
  enqueued.replaceChildren(timeCell(item.enqueued_at));
  started.replaceChildren(timeCell(item.started_at));
  finished.replaceChildren(timeCell(item.finished_at));
  setText(backend, item.backend || "—");
  setText(attempts, String(item.attempts));
  const chosen = item.id === view.selected;
  row.classList.toggle("selected", chosen);
  if (chosen) row.setAttribute("aria-current", "true");
  else row.removeAttribute("aria-current");
}

function renderList() {
  const body = $("task-list").tBodies[0];
  const keep = new Set(view.items.map((item) => item.id));
  for (const [id, row] of view.rows) {
    if (!keep.has(id)) {
      row.remove();
      view.rows.delete(id);
    }
  }
  view.items.forEach((item, index) => {
    let row = view.rows.get(item.id);
    if (!row) {
      row = makeRow(item.id);
      view.rows.set(item.id, row);
    }
    fillRow(row, item);
    if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
  });
  $("empty").hidden = view.items.length > 0;
  $("load-more").hidden = !view.next;
  for (const item of view.items) {
    if (item.backend) view.backends.add(item.backend);
    if (item.retry_of) view.retryOf.set(item.id, item.retry_of);
  }
  fillOptions($("filter-backend"), view.backends, view.filters.backend);
}

function patchRow(status) {
  const index = view.items.findIndex((item) => item.id === status.id);
  if (index < 0) return;
  view.items[index] = status;
  fillRow(view.rows.get(status.id), status);
}

async function refreshList() {
  if (view.loadingMore) return;
  const generation = view.generation;
  const limit = Math.min(MAX_PAGE, Math.max(PAGE, view.items.length));
  const page = await request("GET", listURL(limit));
  if (generation !== view.generation || view.loadingMore) return;
  if (view.items.length <= limit) {
    view.items = page.items;
    view.next = page.next;
  } else {
    // more is shown than one page holds: renew the newest, keep the older ones as they were
    const fresh = new Set(page.items.map((item) => item.id));
    const last = page.items[page.items.length - 1];
    const oldest = last ? Date.parse(last.enqueued_at) : Infinity;
    const older = view.items.filter(
      (item) => !fresh.has(item.id) && Date.parse(item.enqueued_at) < oldest,
    );
    view.items = page.items.concat(older);
  }
  renderList();
}

async function loadMore() {
  if (!view.next || view.loadingMore) return;
  const button = $("load-more");
  const generation = view.generation;
  view.loadingMore = true;
  button.disabled = true;
  try {
    const page = await request("GET", listURL(PAGE, view.next));
    if (generation !== view.generation) return;
    const known = new Set(view.items.map((item) => item.id));
    view.items.push(...page.items.filter((item) => !known.has(item.id)));
    view.next = page.next;
    renderList();
  } catch (error) {
    say("list-message", `Could not load more calls: ${error.message}`, true);
  } finally {
    view.loadingMore = false;
    button.disabled = false;
  }
}

function setFilters(changes) {
  Object.assign(view.filters, changes);
  for (const [name, value] of Object.entries(view.filters)) {
    const select = document.querySelector(`select[name="${name}"]`);
    if (value && ![...select.options].some((option) => option.value === value)) {
      select.append(el("option", { value }, value));
    }
    select.value = value;
  }
  view.generation += 1;
  view.items = [];
  view.next = null;
  renderList();
  saveAddress();
  tick();
}

// -- the live loop ------------------------------------------------------------------------------

let timer = null;
let ticking = false;
let again = false;

async function refresh() {
  const [list, stats] = await Promise.allSettled([
    refreshList(),
    request("GET", `${API.href}/stats`),
  ]);
  if (stats.status === "fulfilled") renderCounts(stats.value);
  const failed = [list, stats].find((answer) => answer.status === "rejected");
  const live = $("live");
  live.classList.toggle("down", Boolean(failed));
  if (failed) {
    setText($("updated"), "not updating");
    say("list-message", `Cannot read the tasks API: ${failed.reason.message}`, true);
  } else {
    setText($("updated"), `live · updated ${clock.format(new Date())}`);
    say("list-message", "");
  }
  renderDetailTimes();
}

// One refresh at a time; a refresh asked for during one runs right after it.
async function tick() {
  if (ticking) {
    again = true;
    return;
  }
  ticking = true;
  clearTimeout(timer);
  try {
    do {
      again = false;
      if (!document.hidden) await refresh();
    } while (again);
  } finally {
    ticking = false;
    timer = setTimeout(tick, REFRESH_MS);
  }
}

// -- one call's details -------------------------------------------------------------------------

function callLink(id, testid) {
  const link = el("button", { type: "button", class: "link id", "data-testid": testid }, id);
  link.addEventListener("click", () => openDetail(id));
  return link;
}

function showDetail(status) {
  view.detail = status;
  setText($("detail-task"), status.task_name || "(unknown task)");
  setBadge($("detail-state"), status.state);
  const noProgress = status.progress === null || status.progress === undefined;
  $("detail-progress").parentElement.hidden = noProgress && FINAL.has(status.state);
  setBar($("detail-progress"), status.progress);
  setText(
    $("detail-progress-text"),
    noProgress ? "no progress reported" : percent(status.progress),
  );
  setText($("detail-progress-message"), status.progress_message || "");
  setText($("detail-id"), status.id);
  setText($("detail-backend"), status.backend || "—");
  setText($("detail-attempts"), String(status.attempts ?? 0));
  // a backend's single status may leave out what its list says: the link the list gave is kept
  const original = status.retry_of || view.retryOf.get(status.id);
  const retryOf = $("detail-retry-of");
  if (original) {
    if (retryOf.textContent !== original) {
      retryOf.replaceChildren(callLink(original, "detail-retry-of-link"));
    }
  } else {
    setText(retryOf, "—");
  }
  const kept = status.args !== null || status.kwargs !== null;
  setValue($("detail-args"), kept ? json(status.args ?? []) : null, "not kept");
  setValue($("detail-kwargs"), kept ? json(status.kwargs ?? {}) : null, "not kept");
  setValue($("detail-result"), status.state === "succeeded" ? json(status.result) : null, "—");
  const error = status.error;
  $("detail-error").hidden = !error;
  setText($("detail-error-type"), error ? error.type : "");
  setText($("detail-error-message"), error ? error.message : "");
  setText($("detail-traceback"), error && error.traceback ? error.traceback : "");
  $("detail-traceback").hidden = !(error && error.traceback);
  $("cancel").hidden = !CANCELLABLE.has(status.state);
  $("retry").hidden = !RETRYABLE.has(status.state);
  renderDetailTimes();
}

function renderDetailTimes() {
  const status = view.detail;
  if (!status || $("detail").hidden) return;
  for (const field of ["enqueued", "started", "finished"]) {
    const iso = status[`${field}_at`];
    const cell = $(`detail-${field}`);
    if (!iso) {
      setText(cell, "—");
      continue;
    }
    const date = new Date(iso);
    const time = el("time", { datetime: iso, title: fullTime.format(date) }, when(date));
    const parts = [time, ` (${ago(date)})`];
    if (field === "finished" && status.started_at) {
      parts.push(`, took ${duration(status.started_at, iso)}`);
    }
    cell.replaceChildren(...parts);
  }
}

function stopWatching() {
  if (view.stream) view.stream.close();
  view.stream = null;
  clearTimeout(view.poll);
  view.poll = null;
  $("detail-live").hidden = true;
}

// Progress and state changes are pushed by the call's event stream; it is closed here at the
// final state (otherwise the browser would reconnect).
function watch(id) {
  stopWatching();
  const source = new EventSource(callURL(id, "/events"));
  view.stream = source;
  source.addEventListener("open", () => {
    if (view.stream === source) $("detail-live").hidden = false;
  });
  source.addEventListener("message", (event) => {
    if (view.stream !== source) return;
    let status;
    try {
      status = JSON.parse(event.data);
    } catch {
      return;
    }
    showDetail(status);
    patchRow(status);
    if (FINAL.has(status.state)) stopWatching();
  });
  source.addEventListener("error", () => {
    // while CONNECTING the browser retries by itself; CLOSED means the stream was refused
    if (view.stream !== source || source.readyState !== EventSource.CLOSED) return;
    view.stream = null;
    $("detail-live").hidden = true;
    poll(id);
  });
}

function poll(id) {
  clearTimeout(view.poll);
  view.poll = setTimeout(async () => {
    if (view.selected !== id) return;
    try {
      const status = await request("GET", callURL(id));
      if (view.selected !== id) return;
      showDetail(status);
      if (FINAL.has(status.state)) return;
    } catch (error) {
      if (view.selected === id) say("detail-message", error.message, true);
    }
    poll(id);
  }, REFRESH_MS);
}

async function loadDetail(id) {
  try {
    const status = await request("GET", callURL(id));
    if (view.selected !== id) return;
    showDetail(status);
    if (FINAL.has(status.state)) stopWatching();
    else if (!view.stream && !view.poll) watch(id);
  } catch (error) {
    if (view.selected !== id) return;
    stopWatching();
    say("detail-message", error.message, true);
  }
}

function openDetail(id) {
  const pane = $("detail");
  if (view.selected !== id || pane.hidden) {
    stopWatching();
    view.selected = id;
    view.detail = null;
    say("detail-message", "");
    for (const [rowId, row] of view.rows) {
      row.classList.toggle("selected", rowId === id);
      if (rowId === id) row.setAttribute("aria-current", "true");
      else row.removeAttribute("aria-current");
    }
    pane.hidden = false;
    setText($("detail-id"), id);
    saveAddress();
  }
  loadDetail(id);
}

function closeDetail() {
  const id = view.selected;
  stopWatching();
  view.selected = null;
  view.detail = null;
  $("detail").hidden = true;
  saveAddress();
  const row = id && view.rows.get(id);
  if (row) {
    row.classList.remove("selected");
    row.removeAttribute("aria-current");
    row.querySelector("button").focus();
  }
}

async function cancelSelected() {
  const id = view.selected;
  const button = $("cancel");
  button.disabled = true;
  say("detail-message", "Cancelling…");
  try {
    const answer = await request("DELETE", callURL(id));
    if (view.selected === id) say("detail-message", `Cancelled: ${answer.detail}`);
  } catch (error) {
    if (view.selected === id) say("detail-message", `Not cancelled: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
  if (view.selected === id) await loadDetail(id);
  tick();
}

async function retrySelected() {
  const id = view.selected;
  const button = $("retry");
  button.disabled = true;
  say("detail-message", "Starting it again…");
  try {
    const fresh = await request("POST", callURL(id, "/retry"));
    view.retryOf.set(fresh.id, fresh.retry_of || id);
    if (view.selected === id) {
      const message = $("detail-message");
      message.classList.remove("error");
      message.replaceChildren("Started again as call ", callLink(fresh.id, "retry-new-call"), ".");
    }
  } catch (error) {
    if (view.selected === id) say("detail-message", `Not retried: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
  tick();
}

// -- start --------------------------------------------------------------------------------------

function start() {
  const call = readAddress();
  buildCounts();
  const stateSelect = $("filter-state");
  for (const state of STATES) stateSelect.append(el("option", { value: state }, state));
  const form = $("filters");
  form.addEventListener("submit", (event) => event.preventDefault());
  form.addEventListener("reset", (event) => {
    event.preventDefault();
    setFilters({ state: "", task: "", backend: "" });
  });
  form.addEventListener("change", (event) => {
    const select = event.target;
    if (select.name in view.filters) setFilters({ [select.name]: select.value });
  });
  $("task-list").tBodies[0].addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-id]");
    if (row) openDetail(row.dataset.id);
  });
  $("load-more").addEventListener("click", loadMore);
  $("detail-close").addEventListener("click", closeDetail);
  $("cancel").addEventListener("click", cancelSelected);
  $("retry").addEventListener("click", retrySelected);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("detail").hidden) closeDetail();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) tick();
  });
  setFilters({}); // shows the filters from the address and starts the live loop
  if (call) openDetail(call);
}

start();
