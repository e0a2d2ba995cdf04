// Small DOM and formatting helpers. Server data only ever goes in as text (textContent and
// attribute values), never as HTML, so a label or an error message cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

export function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "onclick") element.addEventListener("click", value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function replaceChildren(parent, ...children) {
  parent.replaceChildren(...children.flat(Infinity).filter((child) => child !== null && child !== undefined));
}

// "AGENT_STATUS_READY" -> "READY"
export function enumName(value, prefix) {
  return String(value || "").replace(prefix, "") || "UNSPECIFIED";
}

export function millis(timestamp) {
  if (!timestamp) return 0;
  const value = Date.parse(timestamp);
  // The zero Timestamp (1970) means "never" in proto3 JSON with defaults written out.
  return Number.isNaN(value) || value <= 0 ? 0 : value;
}

export function ago(timestamp, now = Date.now()) {
  const at = millis(timestamp);
  if (!at) return "never";
  const seconds = Math.max(0, (now - at) / 1000);
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${Math.floor(seconds / 3600)} h ago`;
}

// A proto3 JSON Duration ("3725.5s") as "1 h 2 min 5 s".
export function duration(text) {
  let seconds = Math.floor(parseFloat(String(text || "0").replace("s", "")) || 0);
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
    if (seconds >= size) {
      parts.push(`${Math.floor(seconds / size)} ${unit}`);
      seconds %= size;
    }
  }
  parts.push(`${seconds} s`);
  return parts.slice(0, 3).join(" ");
}

// An inline SVG polyline of `points` ([x, y] with x and y in 0..1, y up), `width` x `height` px.
export function sparkline(points, { width = 120, height = 24, className = "spark" } = {}) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", className);
  if (points.length > 1) {
    const line = document.createElementNS(SVG_NS, "polyline");
    const coordinates = points.map(
      ([x, y]) => `${(x * (width - 2) + 1).toFixed(1)},${((1 - y) * (height - 2) + 1).toFixed(1)}`,
    );
    line.setAttribute("points", coordinates.join(" "));
    svg.append(line);
  }
  return svg;
}

export function svg(tag, attributes) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}
