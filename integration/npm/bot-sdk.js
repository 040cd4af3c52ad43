// An application service bot on matrix-bot-sdk (pinned in package.json), no
// encryption, for the integration tests. Its bot joins rooms it is invited
// to and echoes messages; "ghost NAME" makes the ghost @botsdk_NAME join and
// talk; a user query creates the ghost with a displayname.
// Env: HS_URL, PORT, AS_TOKEN, HS_TOKEN. Prints "LISTENING" once up.
"use strict";
const { Appservice, AutojoinRoomsMixin, MemoryStorageProvider, LogService, LogLevel, RichConsoleLogger } = require("matrix-bot-sdk");

LogService.setLogger(new RichConsoleLogger());
LogService.setLevel(LogLevel.INFO);
const appservice = new Appservice({
  port: Number(process.env.PORT),
  bindAddress: "127.0.0.1",
  homeserverName: "localhost",
  homeserverUrl: process.env.HS_URL,
  storage: new MemoryStorageProvider(),
  registration: {
    id: "botsdk",
    as_token: process.env.AS_TOKEN,
    hs_token: process.env.HS_TOKEN,
    sender_localpart: "botsdkbot",
    namespaces: { users: [{ exclusive: true, regex: "@botsdk_.*:localhost" }], rooms: [], aliases: [] },
  },
});
AutojoinRoomsMixin.setupOnAppservice(appservice);

function failed(what, err) {
  console.error("FAILED " + what + ": " + (err.stack || err));
  console.log("FAILED " + JSON.stringify({ what, error: String(err.message || err) }));
}

appservice.on("query.user", (userId, createUser) => {
  createUser({ display_name: "Ghost " + userId.slice(1).split(":")[0] });
});

appservice.on("room.message", async (roomId, ev) => {
  const body = ev.content && ev.content.body;
  if (typeof body !== "string" || appservice.isNamespacedUser(ev.sender)) {
    return;
  }
  try {
    await appservice.botIntent.sendText(roomId, "echo: " + body, "m.notice");
    const name = body.match(/^ghost (\w+)$/);
    if (name) {
      const ghost = appservice.getIntentForSuffix(name[1]);
      await ghost.ensureRegistered();
      await ghost.underlyingClient.setDisplayName("Ghost " + name[1]);
      await appservice.botClient.inviteUser(ghost.userId, roomId);
      await ghost.joinRoom(roomId);
      await ghost.sendText(roomId, "hello from " + name[1]);
    }
  } catch (err) {
    failed("handling a message in " + roomId, err);
  }
});
appservice.on("room.failed_decryption", (roomId, ev, err) => failed("decryption in " + roomId, err));

appservice
  .begin()
  .then(() => console.log("LISTENING"))
  .catch((err) => {
    console.error(err);
    process.exit(1);
  });
process.on("SIGTERM", () => {
  appservice.stop();
  process.exit(0);
});
