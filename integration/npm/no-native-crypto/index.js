// Stand-in for @matrix-org/matrix-sdk-crypto-nodejs: the real package's
// install step downloads a prebuilt native library, which CI cannot fetch.
// matrix-bot-sdk requires it when loaded, even for bots without encryption;
// any actual use throws, so a bot that tried to encrypt would fail loudly.
"use strict";
function unavailable(name) {
  const fail = () => {
    throw new Error("native matrix-sdk-crypto is not installed (" + name + ")");
  };
  return new Proxy(function () {}, {
    get: (_, key) => (key === "prototype" ? {} : unavailable(name + "." + String(key))),
    apply: fail,
    construct: fail,
  });
}
module.exports = new Proxy({}, { get: (_, key) => (key === "__esModule" ? false : unavailable(String(key))) });
