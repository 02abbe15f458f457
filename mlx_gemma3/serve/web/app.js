// The chat page: talks to this server's /v1/chat/completions (streamed), keeps the conversation in localStorage.
// Your messages are shown as text (textContent). The model's replies are Markdown, rendered by the vendored marked
// and sanitized by the vendored DOMPurify (vendor/README.md): HTML in a reply is shown as text, never parsed, and
// what the Markdown makes keeps only harmless elements and links, so no script, handler or javascript: link can
// come from a reply.
"use strict";

const CONVERSATION_KEY = "mlx_gemma3.conversation";
const SETTINGS_KEY = "mlx_gemma3.settings";
const API_KEY_KEY = "mlx_gemma3.api_key";  // in sessionStorage: forgotten when the browser closes
const DEFAULT_SETTINGS = { system: "", temperature: 1.0, top_p: 0.95, max_tokens: 1024 };
const LARGEST_IMAGE_SIDE = 1792;  // larger pictures are scaled down in the browser before they are sent
const LARGEST_UNSCALED_BYTES = 3 * 2 ** 20;
// What a rendered reply may hold: the elements Markdown makes, nothing else (no images: the alt text is shown).
const SAFE_MARKUP = {
  ALLOWED_TAGS: ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "code", "pre",
    "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "a"],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
  RETURN_DOM_FRAGMENT: true,
};

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, className) {
  const node = element("button", className, label);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

function escapeHTML(text) {
  const codes = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return text.replace(/[&<>"']/g, (c) => codes[c]);
}

// GitHub-flavoured Markdown with the model's own HTML escaped: it shows as the text it is.
const markdown = new marked.Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html: ({ text, block }) => (block ? `<p class="raw">${escapeHTML(text.trim())}</p>` : escapeHTML(text)),
    code: ({ text, lang }) => {
      const language = (lang || "").match(/^[\w+-]+/)?.[0];
      return `<pre><code${language ? ` class="language-${language}"` : ""}>${escapeHTML(text)}</code></pre>`;
    },
    image: ({ text }) => escapeHTML(text),
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {  // a link opens beside the chat, and the page it opens cannot reach back
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const box = element("textarea");  // pages served to other machines over http have no clipboard API
  box.value = text;
  document.body.append(box);
  box.select();
  document.execCommand("copy");
  box.remove();
}

function codeBlock(pre) {
  const block = element("div", "code-block");
  const copy = button("Copy", async () => {
    try {
      await copyText(pre.textContent);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Cannot copy";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  }, "copy");
  pre.replaceWith(block);
  block.append(copy, pre);
}

// A reply as Markdown: sanitized elements only, each code block with a copy button.
function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(markdown.parse(text), SAFE_MARKUP);
  for (const node of [...fragment.childNodes]) {
    if (node.nodeType === Node.TEXT_NODE && !node.textContent.trim()) node.remove();  // the newlines between blocks
  }
  fragment.querySelectorAll("pre").forEach(codeBlock);
  return fragment;
}

function renderText(text) {
  return element("div", "text", text.replace(/^\n+|\n+$/g, ""));
}

function statsText(stats) {
  const parts = [`${stats.completion_tokens} tokens`];
  if (stats.tokens_per_second !== null) parts.push(`${stats.tokens_per_second.toFixed(1)} tok/s`);
  if (stats.first_token_seconds !== null) parts.push(`first token ${stats.first_token_seconds.toFixed(2)} s`);
  parts.push(`${stats.cached_tokens} of ${stats.prompt_tokens} prompt tokens cached`);
  return parts.join(" · ");
}

// The server's events, one parsed JSON object each, until data: [DONE].
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `the server answered ${response.status}`;
  }
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// A data: URL of the image, scaled down first when it is large.
async function imageDataURL(file) {
  const url = await readAsDataURL(file);
  if (file.size <= LARGEST_UNSCALED_BYTES) return url;
  const image = new Image();
  image.src = url;
  await image.decode();
  const scale = Math.min(1, LARGEST_IMAGE_SIDE / Math.max(image.width, image.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(image.width * scale);
  canvas.height = Math.round(image.height * scale);
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.92);
}

function loadJSON(storage, key, fallback) {
  try {
    return JSON.parse(storage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

class ChatPage {
  constructor() {
    this.messages = loadJSON(localStorage, CONVERSATION_KEY, []);
    this.settings = { ...DEFAULT_SETTINGS, ...loadJSON(localStorage, SETTINGS_KEY, {}) };
    this.apiKey = sessionStorage.getItem(API_KEY_KEY) || "";
    this.pending = [];  // data: URLs of the images attached to the next message
    this.controller = null;  // the AbortController of the reply being streamed
    this.editing = -1;  // the index of the message being edited
    this.vision = false;
  }

  start() {
    this.bindSettings();
    this.bindComposer();
    $("new-chat").addEventListener("click", () => this.newChat());
    $("toggle-settings").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
    });
    this.render();
    this.loadModel();
  }

  headers() {
    const headers = { "Content-Type": "application/json" };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    return headers;
  }

  async loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: this.headers() });
      if (!response.ok) throw new Error(await errorMessage(response));
      const model = (await response.json()).data[0];
      $("model-name").textContent = model.id;
      $("model-note").hidden = !model.base_model;
      this.vision = Boolean(model.vision);
      this.notice("");
    } catch (error) {
      this.notice(`Cannot reach the model: ${error.message}`);
    }
    $("attach").disabled = !this.vision;
    $("attach").title = this.vision ? "Attach images (or drop or paste them)" : "This model reads text only";
  }

  notice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
  }

  bindSettings() {
    const fields = { system: "system", temperature: "temperature", "top-p": "top_p", "max-tokens": "max_tokens" };
    for (const [id, name] of Object.entries(fields)) {
      const input = $(id);
      input.value = this.settings[name];
      input.addEventListener("input", () => {
        this.settings[name] = input.type === "number" ? (input.value === "" ? null : Number(input.value)) : input.value;
        localStorage.setItem(SETTINGS_KEY, JSON.stringify(this.settings));
      });
    }
    $("api-key").value = this.apiKey;
    $("api-key").addEventListener("change", () => {
      this.apiKey = $("api-key").value.trim();
      sessionStorage.setItem(API_KEY_KEY, this.apiKey);
      this.loadModel();
    });
  }

  bindComposer() {
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => this.controller?.abort());
    $("attach").addEventListener("click", () => $("file-input").click());
    $("file-input").addEventListener("change", () => {
      this.attach($("file-input").files);
      $("file-input").value = "";
    });
    document.addEventListener("paste", (event) => {
      if (event.clipboardData.files.length) {
        event.preventDefault();
        this.attach(event.clipboardData.files);
      }
    });
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      $("composer").classList.add("dropping");
    });
    document.addEventListener("dragleave", () => $("composer").classList.remove("dropping"));
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      $("composer").classList.remove("dropping");
      this.attach(event.dataTransfer.files);
    });
  }

  async attach(files) {
    const images = [...files].filter((file) => file.type.startsWith("image/"));
    if (!images.length) return;
    if (!this.vision) {
      this.notice("This model reads text only: images cannot be attached.");
      return;
    }
    try {
      for (const file of images) this.pending.push(await imageDataURL(file));
      this.notice("");
    } catch (error) {
      this.notice(`Cannot read that image: ${error.message}`);
    }
    this.renderAttachments();
  }

  renderAttachments() {
    const box = $("attachments");
    box.replaceChildren();
    this.pending.forEach((url, index) => {
      const item = element("div", "attachment");
      const image = element("img");
      image.src = url;
      image.alt = `attached image ${index + 1}`;
      item.append(image, button("×", () => {
        this.pending.splice(index, 1);
        this.renderAttachments();
      }));
      box.append(item);
    });
  }

  save() {
    try {
      localStorage.setItem(CONVERSATION_KEY, JSON.stringify(this.messages));
    } catch {
      this.notice("The conversation is too large for this browser's storage (images take the most room): "
        + "it stays on the page but will not survive a reload.");
    }
  }

  newChat() {
    if (this.controller) return;
    this.messages = [];
    this.editing = -1;
    this.save();
    this.render();
  }

  send() {
    const text = $("input").value.trim();
    if (this.controller || (!text && !this.pending.length)) return;
    this.messages.push({ role: "user", content: text, images: this.pending });
    this.pending = [];
    $("input").value = "";
    this.renderAttachments();
    this.reply();
  }

  // The conversation as the API takes it: replies that failed before any text are left out, and the turns that
  // then follow each other with the same role are joined (the chat template wants user and model to alternate).
  requestMessages() {
    const turns = [];
    for (const message of this.messages) {
      if (message.role === "assistant" && message.content === "") continue;
      const previous = turns.at(-1);
      if (previous?.role === message.role) {
        previous.text = [previous.text, message.content].filter(Boolean).join("\n\n");
        previous.images.push(...(message.images ?? []));
      } else {
        turns.push({ role: message.role, text: message.content, images: [...(message.images ?? [])] });
      }
    }
    const content = (turn) => turn.images.length
      ? [...turn.images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text: turn.text }]
      : turn.text;
    const system = this.settings.system.trim();
    return [...(system ? [{ role: "system", content: system }] : []),
      ...turns.map((turn) => ({ role: turn.role, content: content(turn) }))];
  }

  requestBody() {
    const body = { messages: this.requestMessages(), stream: true, stream_options: { include_usage: true } };
    for (const name of ["temperature", "top_p", "max_tokens"]) {
      if (this.settings[name] !== null && this.settings[name] !== "") body[name] = this.settings[name];
    }
    return body;
  }

  async reply() {
    const body = this.requestBody();
    const message = { role: "assistant", content: "" };
    this.messages.push(message);
    this.controller = new AbortController();
    this.editing = -1;
    this.notice("");
    this.save();
    this.render();
    const started = performance.now();
    let firstAt = null, usage = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: this.headers(), body: JSON.stringify(body), signal: this.controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const event of serverEvents(response)) {
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        const delta = event.choices?.[0]?.delta?.content;
        if (delta) {
          firstAt ??= performance.now();
          message.content += delta;
          this.renderLast();
        }
      }
      message.stats = this.stats(usage, started, firstAt, performance.now());
    } catch (error) {
      if (error.name === "AbortError") message.stopped = true;
      else message.error = error.message;
    } finally {
      this.controller = null;
      this.save();
      this.render();
    }
  }

  stats(usage, started, firstAt, endedAt) {
    if (!usage) return null;
    const decoding = firstAt === null ? 0 : (endedAt - firstAt) / 1000;
    return {
      completion_tokens: usage.completion_tokens,
      prompt_tokens: usage.prompt_tokens,
      cached_tokens: usage.prompt_tokens_details?.cached_tokens ?? 0,
      tokens_per_second: usage.completion_tokens > 1 && decoding > 0 ? (usage.completion_tokens - 1) / decoding : null,
      first_token_seconds: firstAt === null ? null : (firstAt - started) / 1000,
    };
  }

  regenerate() {
    if (this.controller) return;
    if (this.messages.at(-1)?.role === "assistant") this.messages.pop();
    this.reply();
  }

  edit(index) {
    if (this.controller) return;
    this.editing = index;
    this.render();
  }

  saveEdit(index, text) {
    const message = this.messages[index];
    message.content = text;
    delete message.error;
    delete message.stopped;
    this.editing = -1;
    if (message.role === "user") {  // what followed answered the old text
      this.messages.splice(index + 1);
      this.reply();
    } else {
      this.save();
      this.render();
    }
  }

  render() {
    const busy = this.controller !== null;
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("new-chat").disabled = busy;
    const list = $("messages");
    list.replaceChildren(...this.messages.map((message, index) => this.messageElement(message, index)));
    list.scrollTop = list.scrollHeight;
  }

  renderLast() {
    const list = $("messages");
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    const index = this.messages.length - 1;
    list.lastElementChild.replaceWith(this.messageElement(this.messages[index], index));
    if (nearBottom) list.scrollTop = list.scrollHeight;
  }

  messageElement(message, index) {
    const busy = this.controller !== null;
    const last = index === this.messages.length - 1;
    const node = element("article", `message ${message.role}`);
    if (busy && last) node.classList.add("streaming");
    node.append(element("div", "role", message.role === "user" ? "You" : "Model"));
    if (message.images?.length) {
      const images = element("div", "images");
      for (const url of message.images) {
        const image = element("img");
        image.src = url;
        image.alt = "attached image";
        images.append(image);
      }
      node.append(images);
    }
    if (index === this.editing) {
      const box = element("textarea");
      box.value = message.content;
      node.append(box, button(message.role === "user" ? "Save and regenerate" : "Save",
        () => this.saveEdit(index, box.value), "save"), button("Cancel", () => this.edit(-1)));
      return node;
    }
    const body = element("div", "body");
    body.append(message.role === "assistant" ? renderMarkdown(message.content) : renderText(message.content));
    node.append(body);
    const finished = !(busy && last) && !message.error && !message.stopped;
    if (finished && message.role === "assistant" && message.content.trim() === "") {
      node.append(element("div", "empty", "(the reply has no visible text)"));
    }
    if (message.error) node.append(element("div", "error", `Error: ${message.error}`));
    const footer = element("footer");
    const stats = message.stopped ? "stopped" : message.stats ? statsText(message.stats) : "";
    footer.append(element("span", "stats", stats));
    if (!busy) {
      footer.append(button("Edit", () => this.edit(index), "edit"));
      if (last) footer.append(button("Regenerate", () => this.regenerate(), "regenerate"));
    }
    node.append(footer);
    return node;
  }
}

document.addEventListener("DOMContentLoaded", () => new ChatPage().start());
