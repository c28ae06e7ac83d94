// The demo shop's checkout: Tessera's card fields give a token; the shop's back end charges it.
(function () {
  "use strict";
  var tessera = Tessera(document.body.dataset.publishableKey);
  var card = tessera.cardFields({
    style: {
      base: { fontFamily: "system-ui, sans-serif", fontSize: "16px", color: "#1a1a1a", placeholderColor: "#6b6b6b" },
      invalid: { color: "#b00020" },
    },
    placeholders: { number: "1234 1234 1234 1234" },
  });
  var form = document.getElementById("checkout");
  var button = document.getElementById("pay");
  var brand = document.getElementById("brand");
  var fieldState = document.getElementById("field-state");
  var result = document.getElementById("result");
  var order = crypto.randomUUID();

  function show(outcome, text) {
    result.dataset.outcome = outcome;
    result.textContent = text;
  }

  card.mount("#card-fields");
  card.on("change", function (state) {
    brand.textContent = state.brand === "unknown" ? "—" : state.brand;
    fieldState.textContent = state.error ? state.error.message + " (" + state.error.code + ")" : "";
  });
  card.on("error", function (error) { show("mount_error", error.message + " (" + error.code + ")"); });
  card.on("submit", pay);
  form.addEventListener("submit", function (event) { event.preventDefault(); pay(); });

  function pay() {
    if (button.disabled) return;
    button.disabled = true;
    show("", "");
    tessera.createToken(card).then(function (answer) {
      if (answer.error) {
        show("error", answer.error.message + " (" + answer.error.code + ")");
        return;
      }
      return fetch("/pay", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: answer.token.id, order: order }),
      }).then(function (response) { return response.json(); }).then(function (paid) {
        if (paid.outcome === "approved") {
          show("approved", "Payment approved — thank you! (" + paid.payment + ", " + paid.status + ")");
        } else if (paid.outcome === "declined") {
          show("declined", "Your card was declined: " + paid.decline_code + ".");
        } else if (paid.outcome === "processing") {
          show("processing", "Your payment is processing; we will email you when it completes (" + paid.payment + ").");
        } else {
          show("error", "Something went wrong: " + (paid.message || paid.code));
        }
        // A final answer ends this order; a processing one keeps its id (and idempotency key).
        if (paid.outcome !== "processing") order = crypto.randomUUID();
      });
    }).catch(function () {
      show("error", "The shop could not be reached.");
    }).then(function () { button.disabled = false; });
  }
})();
