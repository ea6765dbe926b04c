// A training step's loss curve as SVG, from its metrics.jsonl rows ({step, train_loss, ...}):
// one line per metric whose name ends in "loss", against the optimizer step.
const SVG = "http://www.w3.org/2000/svg";
const W = 520, H = 220, LEFT = 52, RIGHT = 12, TOP = 12, BOTTOM = 34;

function svg(tag, attributes = {}, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

export function drawCurve(rows) {
  const names = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((k) => k.endsWith("loss")).sort();
  const points = Object.fromEntries(names.map((n) => [n,
    rows.map((r, i) => [r.step ?? i, r[n]]).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y))]));
  const all = Object.values(points).flat();
  const root = svg("svg", { class: "curve", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "loss curve" });
  if (!all.length) return root;
  const [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  const [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  const sx = (x) => LEFT + ((x - x0) / (x1 - x0 || 1)) * (W - LEFT - RIGHT);
  const sy = (y) => TOP + (1 - (y - y0) / (y1 - y0 || 1)) * (H - TOP - BOTTOM);

  root.append(svg("line", { class: "axis", x1: LEFT, y1: H - BOTTOM, x2: W - RIGHT, y2: H - BOTTOM }));
  root.append(svg("line", { class: "axis", x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM }));
  for (const y of [y0, y1]) root.append(svg("text", { x: LEFT - 4, y: sy(y) + 4, "text-anchor": "end" }, y.toPrecision(3)));
  for (const x of [x0, x1]) root.append(svg("text", { x: sx(x), y: H - BOTTOM + 14, "text-anchor": "middle" }, String(x)));
  root.append(svg("text", { x: (LEFT + W) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  names.forEach((name, i) => {
    const line = points[name].map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    root.append(svg(points[name].length > 1 ? "polyline" : "circle", points[name].length > 1
      ? { class: `series s${i}`, points: line }
      : { class: `series s${i}`, cx: sx(points[name][0][0]), cy: sy(points[name][0][1]), r: 3 }));
    root.append(svg("text", { class: `legend s${i}`, x: W - RIGHT, y: TOP + 12 + i * 14, "text-anchor": "end" }, name));
  });
  return root;
}
