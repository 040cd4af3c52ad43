// A small bridge on matrix-appservice-bridge (pinned in package.json) for the
// integration tests. It creates rooms lazily on alias queries, joins its bot
// and its ghosts to rooms they are invited to, echoes messages, and on a user
// query lets the library register the ghost and set its displayname.
// Env: REGISTRATION (file), HS_URL, PORT, DATA_DIR. Prints "LISTENING" once
// up; logs go to stderr.
"use strict";
const path = require("path");
const { Bridge, Logger } = require("matrix-appservice-bridge");

Logger.configure({ console: "info" });
const dataDir = process.env.DATA_DIR;
const bridge = new Bridge({
  homeserverUrl: process.env.HS_URL,
  domain: "localhost",
  registration: process.env.REGISTRATION,
  roomStore: path.join(dataDir, "rooms.db"),
  userStore: path.join(dataDir, "users.db"),
  userActivityStore: path.join(dataDir, "user-activity.db"),
  controller: {
    onAliasQuery: (alias, localpart) => ({
      creationOpts: { room_alias_name: localpart, name: "Lazy " + localpart, preset: "public_chat", visibility: "private" },
    }),
    onUserQuery: (user) => ({ name: "Ghost " + user.localpart }),
    onEvent: async (request) => {
      const ev = request.getData();
      try {
        await handle(ev);
      } catch (err) {
        console.error("FAILED handling " + ev.type + " in " + ev.room_id + ": " + (err.stack || err));
        console.log("FAILED " + JSON.stringify({ type: ev.type, room_id: ev.room_id, error: String(err.message || err) }));
      }
    },
  },
});

async function handle(ev) {
  const bot = bridge.getBot();
  if (ev.type === "m.room.member" && ev.content.membership === "invite" && bot.isRemoteUser(ev.state_key)) {
    await bridge.getIntent(ev.state_key).join(ev.room_id);
    if (ev.state_key !== bot.getUserId()) {
      await bridge.getIntent(ev.state_key).sendText(ev.room_id, "ghost " + ev.state_key + " is here");
    }
    return;
  }
  if (ev.type === "m.room.member" && ev.content.membership === "invite" && ev.state_key === bot.getUserId()) {
    await bridge.getIntent().join(ev.room_id);
    return;
  }
  if (ev.type !== "m.room.message" || bot.isRemoteUser(ev.sender) || ev.sender === bot.getUserId()) {
    return;
  }
  await bridge.getIntent().sendText(ev.room_id, "echo: " + ev.content.body);
}

bridge
  .run(Number(process.env.PORT), undefined, "127.0.0.1")
  .then(() => console.log("LISTENING"))
  .catch((err) => {
    console.error(err);
    process.exit(1);
  });
process.on("SIGTERM", () => bridge.close().then(() => process.exit(0)));
