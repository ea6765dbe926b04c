// The pipeline's DAG as SVG. Layout: a step's column is one more than its deepest dependency;
// within a column, steps keep run order. Only edges that no longer path implies are drawn.
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 170, HEIGHT = 46, GAP_X = 40, GAP_Y = 16, PAD = 8;

function svg(tag, attributes = {}, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// graph: [{name, type, depends, branch}] in run order (engine.step_graph);
// steps: {name: {status, seconds, cache}}; onSelect(name) when a step is clicked.
export function drawDag(graph, steps, onSelect, selected) {
  const column = {}, ancestors = {};
  for (const node of graph) {
    column[node.name] = Math.max(-1, ...node.depends.map((d) => column[d])) + 1;
    ancestors[node.name] = new Set(node.depends.flatMap((d) => [d, ...ancestors[d]]));
  }
  const rows = [];
  const position = {};
  for (const node of graph) {
    const c = column[node.name];
    rows[c] = (rows[c] || 0) + 1;
    position[node.name] = { x: PAD + c * (WIDTH + GAP_X), y: PAD + (rows[c] - 1) * (HEIGHT + GAP_Y) };
  }
  const width = PAD * 2 + rows.length * (WIDTH + GAP_X) - GAP_X;
  const height = PAD * 2 + Math.max(...rows) * (HEIGHT + GAP_Y) - GAP_Y;
  const root = svg("svg", { class: "dag", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "pipeline steps" });

  for (const node of graph) {
    const to = position[node.name];
    for (const dependency of node.depends) {
      // Skip an edge that another dependency already implies (transitive reduction).
      if (node.depends.some((other) => other !== dependency && ancestors[other].has(dependency))) continue;
      const from = position[dependency];
      const [x1, y1, x2, y2] = [from.x + WIDTH, from.y + HEIGHT / 2, to.x, to.y + HEIGHT / 2];
      const middle = (x1 + x2) / 2;
      root.append(svg("path", { class: "edge", d: `M${x1},${y1} C${middle},${y1} ${middle},${y2} ${x2},${y2}` }));
      if (node.branch && node.branch.condition === dependency) {
        root.append(svg("text", { class: "branch", x: middle, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" }, node.branch.if ? "true" : "false"));
      }
    }
  }
  for (const node of graph) {
    const { x, y } = position[node.name];
    const step = steps[node.name] || {};
    const status = step.status || "None";
    const group = svg("g", { class: `node status-${status}${node.name === selected ? " selected" : ""}`, "data-step": node.name, tabindex: 0 });
    group.append(svg("rect", { x, y, width: WIDTH, height: HEIGHT, rx: node.type === "Condition" ? 18 : 5 }));
    group.append(svg("text", { x: x + 8, y: y + 18, class: "name" }, node.name));
    // Second line: the step's type until it has a status, then status, time and reuse.
    const reuse = !step.cache ? "" : step.cache.startsWith("cache hit") ? "cache hit" : "reused";
    const time = step.seconds == null ? "" : `${Math.round(step.seconds)} s`;
    const detail = step.status ? [step.status, time, reuse].filter(Boolean).join(" · ") : node.type;
    group.append(svg("text", { x: x + 8, y: y + 36, class: "detail" }, detail));
    group.append(svg("title", {}, `${node.name} (${node.type})${step.cache ? `\n${step.cache}` : ""}`));
    if (onSelect) {
      group.addEventListener("click", () => onSelect(node.name));
      group.addEventListener("keydown", (event) => event.key === "Enter" && onSelect(node.name));
    }
    root.append(group);
  }
  return root;
}
