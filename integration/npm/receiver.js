// A matrix-appservice (Node) application service for the integration tests:
// it prints every event and ephemeral event it is pushed as one JSON line.
"use strict";
const { AppService } = require("matrix-appservice");

const as = new AppService({ homeserverToken: process.env.HS_TOKEN });
as.on("event", (ev) => console.log("EVENT " + JSON.stringify(ev)));
as.on("ephemeral", (ev) => console.log("EPHEMERAL " + JSON.stringify(ev)));
as.onAliasQuery = (alias, done) => done();
as.onUserQuery = (userId, done) => done();
const server = as.app.listen(0, "127.0.0.1", () => {
  console.log("LISTENING http://127.0.0.1:" + server.address().port);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
