// The hosted guide's calls through the Node `replicate` client, pointed at `blip serve` (tests/test_serve_replicate.py).
// argv[2]: a JSON file {"baseUrl", "auth", "cases": [{"name", "call": "run" | "create", "ref" | "version", "input"}]};
// an input value {"file": PATH} is sent as the file's bytes (a Buffer: the client uploads it to /files).
// Prints {name: output} as JSON; "create" cases give {status, output} after predictions.create and wait.
const fs = require("fs");
const Replicate = require("replicate");

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const replicate = new Replicate({ auth: plan.auth, baseUrl: plan.baseUrl });
  const out = {};
  for (const c of plan.cases) {
    const input = {};
    for (const [key, value] of Object.entries(c.input)) {
      input[key] = value && value.file ? fs.readFileSync(value.file) : value;
    }
    if (c.call === "run") {
      out[c.name] = await replicate.run(c.ref, { input });
    } else {
      const created = await replicate.predictions.create({ version: c.version, input });
      const done = await replicate.wait(created, { interval: 50 });
      out[c.name] = { status: done.status, output: done.output };
    }
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
