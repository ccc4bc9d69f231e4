// LoRA Loom in ComfyUI's editor (and in `loraloom serve`, which serves the same frontend):
// - show the text a node reports (a LoRA's description, a blend recipe, a merge report, where a
//   save went) on the node itself. Our nodes send it in their UI output as `text`, a list of
//   strings; the editor keeps UI output but shows no text of its own, so this adds a read-only box.
// - start a control_after_generate widget at the mode the input declares (PeftMerge's seed:
//   "fixed", so a merge is reproducible by default). The input spec carries the mode under
//   CONTROL_START: the spec's own control_after_generate must stay a boolean for ComfyUI 0.3.64's
//   frontend, which starts every control widget at "randomize".
import { app } from "../../scripts/app.js";

const CATEGORY = "LoRA Loom"; // the first part of every LoRA Loom node's category
const CONTROL_START = "loraloom_control_after_generate";
const TEXT_WIDGET = "loraloom_text";
const controlStarts = {}; // node type -> [[input name, mode], ...]

function showText(node, lines) {
  let widget = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (!widget) {
    const area = document.createElement("textarea");
    area.className = "comfy-multiline-input";
    area.readOnly = true;
    area.spellcheck = false;
    widget = node.addDOMWidget(TEXT_WIDGET, "customtext", area, {
      getValue: () => area.value,
      setValue: (value) => {
        area.value = value;
      },
      getMinHeight: () => 60,
      serialize: false, // not sent with the prompt
    });
    // Not saved in widgets_values either: a saved value would shift every widget after it on load.
    widget.serialize = false;
  }
  widget.value = lines.join("\n");
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "loraloom.Editor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.category?.split("/")[0] !== CATEGORY) return;
    const specs = { ...nodeData.input?.required, ...nodeData.input?.optional };
    controlStarts[nodeData.name] = Object.entries(specs)
      .filter(([, spec]) => typeof spec?.[1]?.[CONTROL_START] === "string")
      .map(([name, spec]) => [name, spec[1][CONTROL_START]]);
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const lines = output?.text;
      if (Array.isArray(lines) && lines.length && lines.every((line) => typeof line === "string")) {
        showText(this, lines);
      }
    };
  },
  // Runs as the node is built, before a loaded workflow's values are set: those win.
  nodeCreated(node) {
    for (const [name, mode] of controlStarts[node.comfyClass] ?? []) {
      const control = node.widgets?.find((w) => w.name === name)?.linkedWidgets?.[0];
      if (control) control.value = mode;
    }
  },
});
