/*! Tessera card fields, v1. Load from the vault with its Subresource Integrity hash:
 *  <script src="https://VAULT/elements/v1/tessera.js" integrity="sha384-…" crossorigin="anonymous"></script>
 *
 *  const tessera = Tessera("pk_live_…");
 *  const card = tessera.cardFields({ style: {…}, placeholders: {…} });
 *  card.mount("#card-fields");
 *  card.on("change", (state) => …);   // { brand, complete, empty, error: { code, message } | null }
 *  const result = await tessera.createToken(card);   // { token } or { error: { type, code, message } }
 *
 *  The card number, expiry and CVC live in one iframe served by the vault's origin; this page
 *  never sees them. Messages go only to the vault's origin and are accepted only from it.
 */
(function (global) {
  "use strict";

  var script = document.currentScript;
  var VAULT_ORIGIN = script ? new URL(script.src).origin : null;
  var MOUNT_TIMEOUT_MS = 10000;
  var TOKEN_TIMEOUT_MS = 30000;

  function TesseraError(type, code, message) {
    this.type = type;
    this.code = code;
    this.message = message;
  }

  function CardFields(tessera, options) {
    this._tessera = tessera;
    this._options = options || {};
    this._listeners = { change: [], ready: [], focus: [], blur: [], error: [], submit: [] };
    this._frame = null;
    this._ready = false;
    this._pending = {};
    this._nextId = 1;
    this.state = { brand: "unknown", complete: false, empty: true, error: null };
    this._onMessage = this._onMessage.bind(this);
  }

  CardFields.prototype.on = function (event, handler) {
    if (!this._listeners[event]) throw new Error("Tessera: unknown event " + event);
    this._listeners[event].push(handler);
    return this;
  };

  CardFields.prototype._emit = function (event, payload) {
    this._listeners[event].forEach(function (handler) {
      try { handler(payload); } catch (e) { setTimeout(function () { throw e; }); }
    });
  };

  CardFields.prototype.mount = function (target) {
    var container = typeof target === "string" ? document.querySelector(target) : target;
    if (!container) throw new Error("Tessera: no element matches " + target);
    if (this._frame) throw new Error("Tessera: the card fields are mounted already");
    var query = new URLSearchParams({ key: this._tessera.publishableKey, origin: window.location.origin });
    var frame = document.createElement("iframe");
    frame.src = VAULT_ORIGIN + "/elements/v1/card.html?" + query.toString();
    frame.title = this._options.title || "Secure card payment fields";
    frame.name = "tessera-card-fields";
    frame.setAttribute("allow", "");
    frame.setAttribute("scrolling", "no");
    frame.style.cssText = "border:0;width:100%;min-height:7em;display:block;overflow:hidden;color-scheme:normal";
    window.addEventListener("message", this._onMessage);
    container.appendChild(frame);
    this._frame = frame;
    var self = this;
    this._mountTimer = setTimeout(function () {
      if (!self._ready) {
        self._emit("error", new TesseraError("mount_error", "fields_unavailable",
          "The card fields could not be loaded on this page (is its origin registered?)."));
      }
    }, MOUNT_TIMEOUT_MS);
    return this;
  };

  CardFields.prototype.unmount = function () {
    window.removeEventListener("message", this._onMessage);
    if (this._frame && this._frame.parentNode) this._frame.parentNode.removeChild(this._frame);
    this._frame = null;
    this._ready = false;
  };

  CardFields.prototype.focus = function () { this._post({ type: "focus" }); };
  CardFields.prototype.clear = function () { this._post({ type: "clear" }); };

  CardFields.prototype._post = function (message) {
    if (!this._frame || !this._frame.contentWindow) return;
    message.tessera = 1;
    // Always an explicit target: only the vault's origin can read it.
    this._frame.contentWindow.postMessage(message, VAULT_ORIGIN);
  };

  CardFields.prototype._onMessage = function (event) {
    if (event.origin !== VAULT_ORIGIN) return;
    if (!this._frame || event.source !== this._frame.contentWindow) return;
    var data = event.data;
    if (!data || data.tessera !== 1) return;
    switch (data.type) {
      case "ready":
        this._ready = true;
        clearTimeout(this._mountTimer);
        this._post({ type: "configure", style: this._options.style || {}, placeholders: this._options.placeholders || {} });
        this._emit("ready", {});
        break;
      case "resize":
        if (typeof data.height === "number" && data.height > 0 && data.height < 2000) {
          this._frame.style.height = Math.ceil(data.height) + "px";
        }
        break;
      case "change":
        this.state = {
          brand: String(data.state.brand),
          complete: !!data.state.complete,
          empty: !!data.state.empty,
          error: data.state.error ? { code: String(data.state.error.code), message: String(data.state.error.message) } : null,
        };
        this._emit("change", this.state);
        break;
      case "focus":
      case "blur":
        this._emit(data.type, { field: String(data.field) });
        break;
      case "submit":
        this._emit("submit", {});
        break;
      case "result":
        var pending = this._pending[data.id];
        if (!pending) return;
        delete this._pending[data.id];
        clearTimeout(pending.timer);
        if (data.token) pending.resolve({ token: data.token });
        else pending.resolve({ error: new TesseraError(String(data.error.type), String(data.error.code), String(data.error.message)) });
        break;
    }
  };

  CardFields.prototype._createToken = function () {
    var self = this;
    return new Promise(function (resolve) {
      if (!self._ready) {
        resolve({ error: new TesseraError("mount_error", "fields_unavailable", "The card fields are not ready.") });
        return;
      }
      var id = self._nextId++;
      var timer = setTimeout(function () {
        delete self._pending[id];
        resolve({ error: new TesseraError("network_error", "timeout", "The vault did not answer in time.") });
      }, TOKEN_TIMEOUT_MS);
      self._pending[id] = { resolve: resolve, timer: timer };
      self._post({ type: "createToken", id: id });
    });
  };

  function Tessera(publishableKey) {
    if (!(this instanceof Tessera)) return new Tessera(publishableKey);
    if (!/^pk_(test|live)_[0-9a-f]{16,}$/.test(String(publishableKey))) {
      throw new Error("Tessera: a publishable key (pk_…) is required; never a secret key");
    }
    if (!VAULT_ORIGIN) throw new Error("Tessera: load tessera.js from the vault with a <script> tag");
    this.publishableKey = publishableKey;
    this.vaultOrigin = VAULT_ORIGIN;
  }

  Tessera.prototype.cardFields = function (options) {
    return new CardFields(this, options);
  };

  /** Resolves to { token } (the vault's token object) or { error: { type, code, message } }. */
  Tessera.prototype.createToken = function (fields) {
    if (!(fields instanceof CardFields)) {
      return Promise.resolve({ error: new TesseraError("invalid_request_error", "fields_required", "Pass the card fields.") });
    }
    return fields._createToken();
  };

  Tessera.TesseraError = TesseraError;
  global.Tessera = Tessera;
})(window);
