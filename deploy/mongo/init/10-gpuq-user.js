// Creates the `gpuq` MongoDB user, once: the official mongo image runs every file of
// /docker-entrypoint-initdb.d with mongosh, as the root user (MONGO_INITDB_ROOT_*), only when it
// initialises an empty data volume. The user lives in the `admin` database (hence
// `authSource=admin` in GPUQ_STORE_URL) and may read and write the `gpuq` database only; the
// store creates its collections and indexes itself.
//
// Changing MONGO_GPUQ_PASSWORD in .env later does not reach an existing volume: see
// docs/production.md ("Changing a password").
const password = process.env.MONGO_GPUQ_PASSWORD;
if (!password) {
  throw new Error("MONGO_GPUQ_PASSWORD is empty: set it in .env (see .env.example)");
}
// The services carry it inside GPUQ_STORE_URL (mongodb://gpuq:PASSWORD@…): URL-safe only.
if (!/^[A-Za-z0-9._~-]{12,}$/.test(password)) {
  throw new Error(
    "MONGO_GPUQ_PASSWORD must be 12 or more letters, digits or . _ ~ - (e.g. openssl rand -hex 24)",
  );
}
const admin = db.getSiblingDB("admin");
if (admin.getUser("gpuq") === null) {
  admin.createUser({
    user: "gpuq",
    pwd: password,
    roles: [{ role: "readWrite", db: "gpuq" }],
  });
  print("gpuq-init: created user gpuq (readWrite on gpuq)");
} else {
  print("gpuq-init: user gpuq exists; left unchanged");
}
