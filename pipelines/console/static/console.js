// The console's page: pipelines, executions, steps and model packages, from the JSON API of
// pipelines/console/server.py. Plain ES modules, no build step; the DOM is built with
// textContent only (never innerHTML), so nothing read from AWS can run as code here.
import { drawDag } from "./dag.js";
import { drawCurve } from "./chart.js";

const token = document.querySelector('meta[name="console-token"]').content;
const view = document.getElementById("view");
const message = document.getElementById("message");
const POLL_MS = 3000;
const RUNNING = new Set(["Executing", "Stopping", "Starting"]);
let poll = null; // the timer of the view on screen, cleared when the view changes

// h("tag.class", {attribute: value, onclick: fn}, ...children)
export function h(spec, attributes = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const element = document.createElement(tag);
  element.classList.add(...classes);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      element.append(child instanceof Node ? child : String(child));
    }
  }
  return element;
}

// One line at the top of the page: what went wrong (class "error"), or what was done.
function say(text, isError = false) {
  message.textContent = text || "";
  message.className = isError ? "error" : "done";
  message.hidden = !text;
}

async function call(method, path, body) {
  const headers = { "X-Console-Token": token };
  if (body) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body && JSON.stringify(body) });
  } catch {
    throw new Error("the console does not answer: is `llm-pipeline console` still running?");
  }
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}
const get = (path, query = {}) => call("GET", `${path}?${new URLSearchParams(query)}`);
const post = (path, body) => call("POST", path, body);

// Run an action; its failure is the page's one error line.
async function act(what, done) {
  try {
    const result = await what();
    if (done) say(done(result));
    return result;
  } catch (error) {
    say(error.message, true);
    return null;
  }
}

const time = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const seconds = (s) => (s === null || s === undefined ? "" : s < 90 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(1)} min`);
const usd = (value) => (value === null || value === undefined ? "" : `$${value.toFixed(4)}`);
const shortId = (arn) => arn.split("/").pop();
const badge = (status) => h(`span.badge.status-${status || "None"}`, {}, status || "—");
const executionLink = (arn) => h("a", { href: `#/execution/${encodeURIComponent(arn)}` }, shortId(arn));

function table(headings, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

// -- pipelines ------------------------------------------------------------------------------

async function pipelinesView() {
  const pipelines = await get("/api/pipelines");
  view.replaceChildren(h("h2", {}, "Pipelines"),
    pipelines.length ? table(["pipeline", "description", "last execution", "created"],
      pipelines.map((p) => h("tr", {},
        h("td", {}, h("a", { href: `#/pipeline/${encodeURIComponent(p.name)}` }, p.name)),
        h("td", {}, p.description), h("td", {}, time(p.last_execution)), h("td", {}, time(p.created)))))
      : h("p", {}, "No pipelines yet: `llm-pipeline upsert --recipe sft` creates one."));
}

async function pipelineView(name) {
  const pipeline = await get("/api/pipeline", { name });
  const inputs = pipeline.parameters.map((p) => h("input", {
    name: p.Name, value: p.DefaultValue ?? "", "data-default": p.DefaultValue ?? "", title: p.Type,
  }));
  async function start(event) {
    event.preventDefault();
    const parameters = {};
    for (const input of inputs) {
      if (input.value !== input.dataset.default) parameters[input.name] = input.value;
    }
    const started = await act(() => post("/api/start", { pipeline: name, parameters }),
      (r) => `started ${shortId(r.arn)}`);
    if (started) location.hash = `#/execution/${encodeURIComponent(started.arn)}`;
  }
  view.replaceChildren(
    h("h2", {}, pipeline.name), h("p", {}, pipeline.description),
    h("div.graph", {}, drawDag(pipeline.graph, {}, null)),
    h("h3", {}, "Start an execution"),
    h("form.parameters", { onsubmit: start },
      pipeline.parameters.map((p, i) => h("label", {}, h("span", {}, p.Name), inputs[i])),
      h("button", { type: "submit" }, "Start")),
    h("h3", {}, "Executions"),
    table(["execution", "status", "started", "failure"], pipeline.executions.map((e) => h("tr", {},
      h("td", {}, executionLink(e.arn)), h("td", {}, badge(e.status)), h("td", {}, time(e.started)),
      h("td", {}, e.status === "Failed" ? e.failure_reason : ""))))
  );
}

// -- one execution --------------------------------------------------------------------------

async function executionView(arn) {
  let selected = null;
  let running = false;
  let stepPanel = h("section.step");
  const parts = { head: h("section"), dag: h("section.graph"), steps: h("section") };
  view.replaceChildren(parts.head, parts.dag, parts.steps, stepPanel);

  async function refresh() {
    const execution = await get("/api/execution", { arn });
    const byName = Object.fromEntries(execution.steps.map((s) => [s.name, s]));
    renderHead(execution);
    parts.dag.replaceChildren(drawDag(execution.graph, byName, select, selected));
    parts.steps.replaceChildren(table(["step", "status", "started", "duration", "cache", "cost", "attempts"],
      execution.graph.map(({ name }) => {
        const s = byName[name] || {};
        return h(`tr.clickable${name === selected ? ".selected" : ""}`, { onclick: () => select(name) },
          h("td", {}, name), h("td", {}, badge(s.status || "")), h("td", {}, time(s.started)),
          h("td", {}, seconds(s.seconds)), h("td", {}, s.cache || ""), h("td", { title: s.cost_note || "" }, usd(s.usd)),
          h("td", {}, s.attempts ?? ""));
      })));
    if (execution.error) say(execution.error, true);
    running = RUNNING.has(execution.status);
    const stepRunning = selected && RUNNING.has(byName[selected]?.status);
    if (stepRunning) await showStep(selected);
    if (!RUNNING.has(execution.status)) clearInterval(poll);
  }

  function renderHead(e) {
    const buttons = [];
    if (RUNNING.has(e.status)) {
      buttons.push(h("button", { onclick: () => act(() => post("/api/stop", { arn }), () => "stopping").then(refresh) }, "Stop"));
    }
    if (e.status === "Failed") {
      buttons.push(h("button", { onclick: () => act(() => post("/api/retry", { arn }), () => "retrying the failed steps").then(refresh) }, "Retry"));
    }
    parts.head.replaceChildren(
      h("h2", {}, h("a", { href: `#/pipeline/${encodeURIComponent(e.pipeline)}` }, e.pipeline), ` / ${shortId(arn)} `, badge(e.status)),
      h("p", {}, `started ${time(e.started)}`, e.selective ? ` · re-run of ${shortId(e.selective.SourcePipelineExecutionArn || "")}` : "",
        e.cost ? ` · estimated cost ${e.cost.total_usd === null ? "unknown" : usd(e.cost.total_usd)} (${e.cost.timing}, prices of ${e.cost.prices.date})` : ""),
      e.failure_reason ? h("p.failure", {}, e.failure_reason) : "",
      h("div.actions", {}, buttons),
      h("details", {}, h("summary", {}, "parameters"),
        table(["parameter", "value"], Object.entries(e.parameters).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v))))));
  }

  async function select(name) {
    selected = name;
    for (const row of parts.steps.querySelectorAll("tr.clickable")) {
      row.classList.toggle("selected", row.firstChild.textContent === name);
    }
    await showStep(name);
    await act(refresh);
  }

  async function showStep(name) {
    const step = await act(() => get("/api/step", { arn, step: name }));
    if (!step || name !== selected) return;
    // SageMaker re-runs from an execution that ended (SelectiveExecutionConfig).
    const rerun = h("button", {
      disabled: running, title: running ? "wait until the execution ends" : null,
      onclick: async () => {
        const started = await act(() => post("/api/rerun", { arn, step: name }), (r) => `re-running ${r.selected.join(", ")}`);
        if (started) location.hash = `#/execution/${encodeURIComponent(started.arn)}`;
      },
    }, `Re-run from ${name}`);
    const logBox = h("pre.log", {}, step.log.text || step.log.note);
    const panel = h("section.step", {},
      h("h3", {}, name, " ", badge(step.status || "")),
      step.failure_reason ? h("p.failure", {}, step.failure_reason) : "",
      step.outcome ? h("p", {}, step.outcome) : "",
      step.job ? h("p", {}, `${step.job.kind} job ${step.job.name} · ${step.job.status} · ${step.job.instance}`) : "",
      h("div.actions", {}, rerun, h("span.hint", {}, ` runs ${step.rerun_steps.join(" → ")}; the other steps reuse this execution's outputs`)),
      h("div.figures", {},
        step.metrics.length ? table(["metric", "final value"], step.metrics.map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, m.value.toPrecision(5))))) : "",
        step.history.length ? drawCurve(step.history) : ""),
      step.report ? h("iframe.report", { sandbox: "", title: "evaluation report", src: `/api/report?${new URLSearchParams({ uri: step.report })}` }) : "",
      h("h4", {}, "log ", h("small", {}, step.log.source)), logBox);
    stepPanel.replaceWith(panel);
    stepPanel = panel;
    logBox.scrollTop = logBox.scrollHeight;
    if (step.error) say(step.error, true);
  }

  await refresh();
  poll = setInterval(() => act(refresh), POLL_MS);
}

// -- model packages -------------------------------------------------------------------------

// "llm-sft/3" from a model package ARN
const packageName = (arn) => arn.split("/").slice(-2).join("/");

function metricsSummary(p) {
  const names = p.metadata.gate_metric ? [p.metadata.gate_metric]
    : Object.keys(p.metrics).filter((k) => !k.startsWith("base_")).slice(0, 3);
  return names.filter((k) => typeof p.metrics[k] === "number")
    .map((k) => `${k} = ${p.metrics[k].toPrecision(4)}`).join(", ");
}

async function packagesView(open = null) {
  const packages = await get("/api/packages");
  const chosen = new Set();
  const detail = h("section.package");
  const comparison = h("section.comparison");
  const compare = h("button", { disabled: true, onclick: () => showDiff([...chosen]) }, "Compare the two chosen");
  view.replaceChildren(h("h2", {}, "Model packages"),
    packages.length ? table(["", "group", "version", "status", "metrics", "recipe", "base model", "created"],
      packages.map((p) => h("tr.clickable", { onclick: (event) => event.target.type !== "checkbox" && showPackage(p) },
        h("td", {}, h("input", {
          type: "checkbox", "aria-label": `choose ${p.arn}`,
          onchange: (event) => {
            event.target.checked ? chosen.add(p.arn) : chosen.delete(p.arn);
            compare.disabled = chosen.size !== 2;
          },
        })),
        h("td", {}, p.group), h("td", {}, p.version), h("td", {}, badge(p.status)), h("td", {}, metricsSummary(p)),
        h("td", {}, p.metadata.recipe || ""), h("td", {}, p.metadata.parent_model || p.metadata.param_BaseModel || ""),
        h("td", {}, time(p.created)))))
      : h("p", {}, "No model packages yet: an execution whose gate passes registers one."),
    h("div.actions", {}, compare), comparison, detail);
  const reopened = packages.find((p) => p.arn === open);
  if (reopened) showPackage(reopened);

  function showPackage(p) {
    const reason = h("input", { name: "reason", placeholder: "reason (kept as the approval description)", size: 50 });
    const toGroup = h("input", { name: "group", placeholder: "production group, e.g. llm-sft-prod" });
    const setStatus = (status) => act(() => post("/api/approval", { arn: p.arn, status, reason: reason.value }),
      (r) => `${packageName(r.arn)} ${r.status}: ${r.description}`).then((r) => r && packagesView(p.arn));
    const promote = () => act(() => post("/api/promote", { arn: p.arn, group: toGroup.value, reason: reason.value }),
      (r) => (r.created ? `promoted to ${packageName(r.arn)}` : `already promoted: ${packageName(r.arn)}`))
      .then((r) => r && packagesView(r.arn));
    const report = p.metadata.evaluation_report;
    detail.replaceChildren(
      h("h3", {}, `${packageName(p.arn)} `, badge(p.status)),
      h("p", {}, p.arn), p.description ? h("p", {}, `approval: ${p.description}`) : "",
      p.execution ? h("p", {}, "made by execution ", executionLink(p.execution)) : "",
      h("div.actions", {}, reason,
        h("button", { onclick: () => setStatus("Approved") }, "Approve"),
        h("button", { onclick: () => setStatus("Rejected") }, "Reject")),
      h("div.actions", {}, toGroup, h("button", { onclick: promote }, "Promote")),
      h("h4", {}, "metrics"),
      table(["metric", "value"], Object.entries(p.metrics).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, typeof v === "number" ? v.toPrecision(5) : String(v))))),
      h("h4", {}, "lineage and metadata"),
      table(["key", "value"], Object.entries(p.metadata).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v)))),
      report ? h("iframe.report", { sandbox: "", title: "evaluation report", src: `/api/report?${new URLSearchParams({ uri: report })}` }) : "");
    detail.scrollIntoView();
  }

  async function showDiff([a, b]) {
    const rows = await act(() => get("/api/diff", { a, b }));
    if (!rows) return;
    comparison.replaceChildren(h("h3", {}, `A ${packageName(a)} → B ${packageName(b)}`),
      rows.length ? table(["field", "A", "B", "B − A"], rows.map((r) => h("tr", {},
        h("td", {}, r.field), h("td", {}, r.a ?? "—"), h("td", {}, r.b ?? "—"),
        h("td", {}, r.delta === null ? "" : (r.delta > 0 ? "+" : "") + r.delta.toPrecision(4)))))
        : h("p", {}, "no differences"));
  }
}

// -- routing --------------------------------------------------------------------------------

async function route() {
  clearInterval(poll);
  say("");
  const [, kind, argument] = location.hash.match(/^#\/([a-z]+)\/?(.*)$/) || [];
  const views = { pipeline: pipelineView, execution: executionView, packages: packagesView };
  const render = views[kind] || pipelinesView;
  view.replaceChildren(h("p.loading", {}, "loading…"));
  await act(() => render(decodeURIComponent(argument || "")));
}

window.addEventListener("hashchange", route);
act(() => get("/api/overview")).then((o) => {
  if (o) document.getElementById("target").textContent = `${o.target}: ${o.endpoint} · ${o.region}`;
});
route();
