// The official QuickBlox JavaScript SDK, unchanged, pointed at the gateway:
//   node reset.js <gateway host:port> <client token> <email>
// Prints "reset ok" and exits 0 on success, prints the SDK's error and exits 1 otherwise.
const QB = require('quickblox');

const [api, token, email] = process.argv.slice(2);
// An instance of its own, as an app whose other calls go to QuickBlox would use.
const reset = new QB.QuickBlox();
reset.init(token, 12345, null, { endpoints: { api, chat: '127.0.0.1' }, debug: false });
reset.users.resetPassword(email, (error) => {
  if (error) {
    console.log('reset failed: ' + JSON.stringify(error));
    process.exit(1);
  }
  console.log('reset ok');
  process.exit(0);
});
setTimeout(() => {
  console.log('reset failed: no answer within 20s');
  process.exit(2);
}, 20000).unref();
