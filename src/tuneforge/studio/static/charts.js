// SVG charts drawn here (no library): line charts with one marker per logged point, a histogram, a stacked bar.

import { h, s, num } from "./dom.js";

const W = 560, H = 220, M = { left: 66, right: 12, top: 12, bottom: 36 };
export const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/** A colour key; the colour is set through the DOM, since the page's CSP allows no inline style attributes. */
function swatch(i) {
  const el = h("i", { class: "swatch" });
  el.style.background = COLOURS[i % COLOURS.length];
  return el;
}

function scale(lo, hi, from, to) {
  const span = hi - lo || 1;
  return (v) => from + ((v - lo) / span) * (to - from);
}

function extent(values) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  return [lo, hi];
}

/** A line chart. series: [{name, points: [[step, value], ...]}]; every point gets a marker whose title (and
 *  the readout under the chart, on hover) gives its value. Empty series draw "no data yet". */
export function lineChart({ id, title, ylabel, series, xlabel = "step" }) {
  const all = series.flatMap((one) => one.points.filter(([, y]) => y !== null && y !== undefined && isFinite(y)));
  const readout = h("div", { class: "readout" }, all.length ? "hover a point for its value" : "");
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  if (!all.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return h("figure", { id, class: "chart-box" }, h("figcaption", {}, title), svg, readout);
  }
  const [x0, x1] = extent(all.map(([x]) => x));
  const [y0, y1] = extent(all.map(([, y]) => y));
  const X = scale(x0, x1, M.left, W - M.right), Y = scale(y0, y1, H - M.bottom, M.top);
  svg.append(
    s("line", { x1: M.left, y1: H - M.bottom, x2: W - M.right, y2: H - M.bottom, class: "axis" }),
    s("line", { x1: M.left, y1: M.top, x2: M.left, y2: H - M.bottom, class: "axis" }),
    ...[y0, (y0 + y1) / 2, y1].map((v) => s("text", { x: M.left - 4, y: Y(v) + 4, "text-anchor": "end", class: "tick" }, num(v, 3))),
    ...[x0, x1].map((v) => s("text", { x: X(v), y: H - M.bottom + 14, "text-anchor": "middle", class: "tick" }, num(v))),
    s("text", { x: (M.left + W - M.right) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, xlabel),
    s("text", { x: 12, y: (M.top + H - M.bottom) / 2, "text-anchor": "middle", class: "label",
      transform: `rotate(-90 12 ${(M.top + H - M.bottom) / 2})` }, ylabel));
  series.forEach((one, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const points = one.points.filter(([, y]) => y !== null && y !== undefined && isFinite(y));
    svg.append(s("polyline", { class: "line", stroke: colour,
      points: points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ") }));
    for (const [x, y] of points) {
      const text = `${one.name ? one.name + " " : ""}${xlabel} ${x}: ${ylabel} ${num(y, 5)}`;
      svg.append(s("circle", { class: "point", cx: X(x).toFixed(1), cy: Y(y).toFixed(1), r: 2.5, fill: colour,
        "data-step": x, "data-value": y, "data-series": one.name || "" }, s("title", {}, text)));
    }
  });
  svg.addEventListener("mouseover", (event) => {
    const point = event.target.closest("circle.point");
    if (point) readout.textContent = point.querySelector("title").textContent;
  });
  const legend = series.length > 1
    ? h("div", { class: "legend" }, series.map((one, i) => h("span", {}, swatch(i), one.name))) : null;
  return h("figure", { id, class: "chart-box" }, h("figcaption", {}, title), svg, legend, readout);
}

/** Bars over bins: {edges: [n + 1], counts: [n]}. */
export function histogram({ edges, counts }, xlabel = "tokens per example") {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart histogram", role: "img", "aria-label": "length histogram" });
  if (!counts || !counts.length) return svg;
  const X = scale(edges[0], edges[edges.length - 1], M.left, W - M.right);
  const Y = scale(0, Math.max(...counts), H - M.bottom, M.top);
  counts.forEach((count, i) => {
    const left = X(edges[i]), right = X(edges[i + 1]);
    svg.append(s("rect", { class: "bar", x: left + 0.5, y: Y(count), width: Math.max(right - left - 1, 1),
      height: H - M.bottom - Y(count) }, s("title", {}, `${num(edges[i])}–${num(edges[i + 1])} tokens: ${count}`)));
  });
  svg.append(
    s("line", { x1: M.left, y1: H - M.bottom, x2: W - M.right, y2: H - M.bottom, class: "axis" }),
    s("text", { x: M.left, y: H - M.bottom + 14, "text-anchor": "middle", class: "tick" }, num(edges[0])),
    s("text", { x: W - M.right, y: H - M.bottom + 14, "text-anchor": "middle", class: "tick" }, num(edges[edges.length - 1])),
    s("text", { x: M.left - 4, y: M.top + 4, "text-anchor": "end", class: "tick" }, String(Math.max(...counts))),
    s("text", { x: (M.left + W - M.right) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, xlabel),
    s("text", { x: 12, y: (M.top + H - M.bottom) / 2, "text-anchor": "middle", class: "label",
      transform: `rotate(-90 12 ${(M.top + H - M.bottom) / 2})` }, "examples"));
  return svg;
}

/** One horizontal bar split into parts ({name: GB}), with a legend giving each part's size. */
export function stackedBar(parts, unit = "GB") {
  const entries = Object.entries(parts || {}).filter(([, v]) => typeof v === "number" && v > 0);
  const total = entries.reduce((sum, [, v]) => sum + v, 0) || 1;
  const svg = s("svg", { viewBox: `0 0 ${W} 28`, class: "stacked", role: "img", "aria-label": "peak memory by part" });
  let x = 0;
  entries.forEach(([name, value], i) => {
    const width = (value / total) * W;
    svg.append(s("rect", { x, y: 2, width, height: 24, fill: COLOURS[i % COLOURS.length], "data-part": name },
      s("title", {}, `${name}: ${num(value, 3)} ${unit}`)));
    x += width;
  });
  const legend = h("div", { class: "legend" },
    entries.map(([name, value], i) => h("span", {}, swatch(i), `${name} ${num(value, 3)} ${unit}`)));
  return h("div", { class: "memory" }, svg, legend);
}
