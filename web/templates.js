// The order of this pack's workflows in ComfyUI's template browser.
// The browser (frontends 1.27 to 1.49) takes a custom node pack's templates from GET /workflow_templates, which
// lists the workflow files in whatever order the server's directory listing gives, and shows each under its
// file name; it reads no title, description or order from the pack. So the file names are the titles
// ("<model family> - <what it shows>"), and this puts them in order: the quick start, whose name ends in
// QUICK_START, first, then by name, which groups them by model family.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const QUICK_START = "(start here)";
// The key /workflow_templates files this pack's workflows under: the pack's folder, as in this file's URL
// (/extensions/<folder>/templates.js).
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2, -1)[0]);

export function templateOrder(names) {
  const first = (name) => (name.endsWith(QUICK_START) ? 0 : 1);
  return [...names].sort((a, b) => first(a) - first(b) || a.localeCompare(b, undefined, { numeric: true }));
}

app.registerExtension({
  name: "token_reduction.templates",
  init() {
    const listed = api.getWorkflowTemplates;
    if (typeof listed !== "function") return; // a frontend without the call: nothing to order
    api.getWorkflowTemplates = async function (...args) {
      const templates = await listed.apply(this, args);
      if (Array.isArray(templates?.[PACK])) templates[PACK] = templateOrder(templates[PACK]);
      return templates;
    };
  },
});
