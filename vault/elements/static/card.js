/* Tessera card fields: runs inside the iframe on the vault's origin (card.html). The card number,
 * expiry and CVC are read here and sent only to this origin's POST /v1/tokens; the merchant's
 * page (the parent) receives non-sensitive state and the token. */
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("tessera-config").textContent);
  var PARENT_ORIGIN = config.origin; // checked by the vault against the merchant's origins
  var BRANDS = config.brands; // from core.cards: { name: { lengths: [..], cvc: n } }
  var RANGES = config.ranges; // [[low, high, width, brand]], widest first
  var MAX_YEARS_AHEAD = config.max_years_ahead;
  var MESSAGES = {
    invalid_number: "Your card number is not valid.",
    incomplete_number: "Your card number is incomplete.",
    invalid_expiry_month: "The expiry month is not valid.",
    invalid_expiry_year: "The expiry year is not valid.",
    incomplete_expiry: "The expiry date is incomplete.",
    expired_card: "Your card has expired.",
    invalid_cvc: "Your security code is not valid.",
    incomplete_cvc: "Your security code is incomplete.",
  };

  var number = document.getElementById("number");
  var expiry = document.getElementById("expiry");
  var cvc = document.getElementById("cvc");
  var brandBadge = document.getElementById("brand");
  var errorBox = document.getElementById("error");
  var fields = { number: number, expiry: expiry, cvc: cvc };
  var touched = { number: false, expiry: false, cvc: false };
  var lastState = null;

  if (window.parent === window) {
    // Opened on its own, not framed by a merchant's page: nothing to do here.
    document.body.textContent = "";
    return;
  }

  function post(message) {
    message.tessera = 1;
    window.parent.postMessage(message, PARENT_ORIGIN); // never "*"
  }

  function digits(text) { return text.replace(/\D+/g, ""); }

  function luhn(value) {
    var sum = 0;
    for (var i = 0; i < value.length; i++) {
      var d = value.charCodeAt(value.length - 1 - i) - 48;
      if (i % 2 === 1) { d *= 2; if (d > 9) d -= 9; }
      sum += d;
    }
    return value.length > 0 && sum % 10 === 0;
  }

  function brandOf(value) {
    for (var i = 0; i < RANGES.length; i++) {
      var r = RANGES[i];
      if (value.length < r[2]) continue;
      var prefix = parseInt(value.slice(0, r[2]), 10);
      if (prefix >= r[0] && prefix <= r[1]) return r[3];
    }
    return "unknown";
  }

  function groups(brand) {
    if (brand === "amex") return [4, 6, 5];
    if (brand === "diners") return [4, 6, 9];
    return [4, 4, 4, 4, 3];
  }

  function formatNumber(value, brand) {
    var out = [], at = 0, sizes = groups(brand);
    for (var i = 0; i < sizes.length && at < value.length; i++) {
      out.push(value.slice(at, at + sizes[i]));
      at += sizes[i];
    }
    return out.join(" ");
  }

  function maxLength(brand) { return Math.max.apply(null, BRANDS[brand].lengths); }

  function checkNumber(final) {
    var value = digits(number.value);
    var brand = brandOf(value);
    if (!value) return { brand: brand, complete: false, error: final ? "incomplete_number" : null };
    var lengths = BRANDS[brand].lengths;
    var full = value.length >= maxLength(brand);
    if (lengths.indexOf(value.length) >= 0 && luhn(value)) return { brand: brand, complete: true, error: null };
    if (full || final) {
      return { brand: brand, complete: false, error: full || lengths.indexOf(value.length) >= 0 ? "invalid_number" : "incomplete_number" };
    }
    return { brand: brand, complete: false, error: null };
  }

  function checkExpiry(final) {
    var value = digits(expiry.value);
    if (value.length < 4) return { complete: false, error: final ? "incomplete_expiry" : null };
    var month = parseInt(value.slice(0, 2), 10);
    var year = 2000 + parseInt(value.slice(2, 4), 10);
    var now = new Date();
    if (month < 1 || month > 12) return { complete: false, error: "invalid_expiry_month" };
    if (year > now.getFullYear() + MAX_YEARS_AHEAD) return { complete: false, error: "invalid_expiry_year" };
    if (year < now.getFullYear() || (year === now.getFullYear() && month < now.getMonth() + 1)) {
      return { complete: false, error: "expired_card" };
    }
    return { complete: true, error: null, month: month, year: year };
  }

  function checkCvc(brand, final) {
    var value = digits(cvc.value);
    var wanted = BRANDS[brand].cvc;
    if (value.length === wanted) return { complete: true, error: null };
    if (value.length > wanted) return { complete: false, error: "invalid_cvc" };
    return { complete: false, error: final ? "incomplete_cvc" : null };
  }

  function evaluate(final) {
    var n = checkNumber(final || touched.number);
    var e = checkExpiry(final || touched.expiry);
    var c = checkCvc(n.brand, final || touched.cvc);
    var results = { number: n, expiry: e, cvc: c };
    var firstError = null;
    ["number", "expiry", "cvc"].forEach(function (name) {
      var error = results[name].error;
      fields[name].setAttribute("aria-invalid", error ? "true" : "false");
      fields[name].closest(".field").classList.toggle("invalid", !!error);
      if (error && !firstError) firstError = { field: name, code: error };
    });
    brandBadge.dataset.brand = n.brand;
    brandBadge.textContent = n.brand === "unknown" ? "" : n.brand.toUpperCase();
    brandBadge.setAttribute("aria-label", n.brand === "unknown" ? "" : "Card brand: " + n.brand);
    cvc.maxLength = BRANDS[n.brand].cvc;
    cvc.placeholder = placeholders.cvc || (BRANDS[n.brand].cvc === 4 ? "1234" : "123");
    errorBox.textContent = firstError ? MESSAGES[firstError.code] : "";
    var state = {
      brand: n.brand,
      complete: n.complete && e.complete && c.complete,
      empty: !number.value && !expiry.value && !cvc.value,
      error: firstError ? { field: firstError.field, code: firstError.code, message: MESSAGES[firstError.code] } : null,
    };
    var key = JSON.stringify(state);
    if (key !== lastState) {
      lastState = key;
      post({ type: "change", state: state });
    }
    return { state: state, results: results };
  }

  number.addEventListener("input", function () {
    var value = digits(number.value);
    var brand = brandOf(value);
    value = value.slice(0, maxLength(brand));
    var formatted = formatNumber(value, brand);
    if (formatted !== number.value) number.value = formatted;
    var check = checkNumber(false);
    if (check.complete) expiry.focus(); // keyboard users can still Shift+Tab back
    evaluate(false);
  });

  expiry.addEventListener("input", function (event) {
    var value = digits(expiry.value).slice(0, 4);
    if (value.length === 1 && value > "1") value = "0" + value; // "4" means April
    var deleting = event.inputType && event.inputType.indexOf("delete") === 0;
    var formatted = value.length >= 2 && !(deleting && value.length === 2) ? value.slice(0, 2) + " / " + value.slice(2) : value;
    if (formatted !== expiry.value) expiry.value = formatted;
    if (checkExpiry(false).complete) cvc.focus();
    evaluate(false);
  });

  cvc.addEventListener("input", function () {
    var value = digits(cvc.value);
    if (value !== cvc.value) cvc.value = value;
    evaluate(false);
  });

  Object.keys(fields).forEach(function (name) {
    fields[name].addEventListener("blur", function () {
      if (fields[name].value) touched[name] = true;
      evaluate(false);
      post({ type: "blur", field: name });
    });
    fields[name].addEventListener("focus", function () { post({ type: "focus", field: name }); });
  });

  // Styling from the merchant: a fixed list of properties, applied through the CSSOM (the
  // iframe's CSP allows no inline style), so no merchant input can inject markup or script.
  var STYLE_PROPERTIES = ["color", "fontFamily", "fontSize", "fontWeight", "letterSpacing", "lineHeight", "backgroundColor"];
  var placeholders = {};

  function applyStyle(style) {
    var root = document.documentElement.style;
    var base = style.base || {};
    STYLE_PROPERTIES.forEach(function (prop) {
      if (typeof base[prop] === "string" && base[prop].length < 200 && !/[;{}<>]|url\(/i.test(base[prop])) {
        root.setProperty("--tessera-" + prop.replace(/[A-Z]/g, function (c) { return "-" + c.toLowerCase(); }), base[prop]);
      }
    });
    var extra = [["placeholderColor", "--tessera-placeholder-color"], ["invalidColor", "--tessera-invalid-color"]];
    extra.forEach(function (pair) {
      var value = pair[0] === "invalidColor" ? (style.invalid || {}).color : base.placeholderColor;
      if (typeof value === "string" && value.length < 100 && !/[;{}<>]|url\(/i.test(value)) root.setProperty(pair[1], value);
    });
  }

  function applyPlaceholders(given) {
    ["number", "expiry", "cvc"].forEach(function (name) {
      if (typeof given[name] === "string" && given[name].length <= 40) {
        placeholders[name] = given[name];
        fields[name].placeholder = given[name];
      }
    });
  }

  function createToken(id) {
    var check = evaluate(true);
    if (check.state.error || !check.state.complete) {
      var error = check.state.error || { code: "incomplete_number", message: MESSAGES.incomplete_number };
      post({ type: "result", id: id, error: { type: "validation_error", code: error.code, message: error.message } });
      return;
    }
    var e = check.results.expiry;
    fetch("/v1/tokens", {
      method: "POST",
      headers: { "Authorization": "Bearer " + config.key, "Content-Type": "application/json" },
      body: JSON.stringify({ number: digits(number.value), exp_month: e.month, exp_year: e.year, cvc: digits(cvc.value) }),
      credentials: "omit",
      cache: "no-store",
    }).then(function (response) {
      return response.json().then(function (body) {
        if (response.status === 201) {
          post({ type: "result", id: id, token: body });
        } else {
          var err = (body && body.error) || {};
          post({ type: "result", id: id, error: { type: String(err.type || "api_error"), code: String(err.code || "vault_error"), message: String(err.message || "The vault refused the card.") } });
        }
      });
    }).catch(function () {
      post({ type: "result", id: id, error: { type: "network_error", code: "vault_unreachable", message: "The vault could not be reached." } });
    });
  }

  window.addEventListener("message", function (event) {
    if (event.origin !== PARENT_ORIGIN || event.source !== window.parent) return;
    var data = event.data;
    if (!data || data.tessera !== 1) return;
    if (data.type === "configure") {
      applyStyle(data.style || {});
      applyPlaceholders(data.placeholders || {});
      resize();
    } else if (data.type === "createToken" && typeof data.id === "number") {
      createToken(data.id);
    } else if (data.type === "focus") {
      number.focus();
    } else if (data.type === "clear") {
      number.value = expiry.value = cvc.value = "";
      touched = { number: false, expiry: false, cvc: false };
      evaluate(false);
    }
  });

  function resize() {
    post({ type: "resize", height: document.documentElement.scrollHeight });
  }
  if (window.ResizeObserver) new ResizeObserver(resize).observe(document.body);

  // Enter in a field submits the merchant's form, as it would in a field of the page itself.
  // (A form of three text fields and no button has no implicit submission: handle the key.)
  document.getElementById("fields").addEventListener("submit", function (event) {
    event.preventDefault();
  });
  Object.keys(fields).forEach(function (name) {
    fields[name].addEventListener("keydown", function (event) {
      if (event.key === "Enter") {
        event.preventDefault();
        post({ type: "submit" });
      }
    });
  });

  post({ type: "ready" });
  evaluate(false);
  resize();
})();
