// LoRA Loom in ComfyUI's editor: show the text a node reports (a LoRA's description, a blend
// recipe, a merge report, where a save went) on the node itself. Our nodes send it in their UI
// output as `text`, a list of strings; the editor keeps UI output but shows no text of its own, so
// this extension adds a read-only text box to the node when such output arrives.
import { app } from "../../scripts/app.js";

const CATEGORY = "LoRA Loom"; // the first part of every LoRA Loom node's category
const WIDGET = "loraloom_text";

function showText(node, lines) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const area = document.createElement("textarea");
    area.className = "comfy-multiline-input";
    area.readOnly = true;
    area.spellcheck = false;
    widget = node.addDOMWidget(WIDGET, "customtext", area, {
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
  name: "loraloom.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.category?.split("/")[0] !== CATEGORY) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const lines = output?.text;
      if (Array.isArray(lines) && lines.length && lines.every((line) => typeof line === "string")) {
        showText(this, lines);
      }
    };
  },
});
