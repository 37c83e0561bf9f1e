-- One message through the milter, as an independent MTA (Debian's miltertest) would send it; prints what the
-- milter answered at end-of-message and which edits it asked for.  Globals (-D): SOCK, HNAME, HVALUE,
-- SENDER, SASL (empty: none), SUBJECT (expected new Subject; empty: not checked).
mt.set_timeout(10)
local conn = mt.connect(SOCK, 40, 0.25)
assert(conn, "no connection to " .. SOCK)
assert(mt.negotiate(conn, 6, nil, 0x1FFFFF) == nil)
assert(mt.macro(conn, SMFIC_CONNECT, "v", "Postfix 3.10.4") == nil)
assert(mt.conninfo(conn, "client.test", "192.0.2.7") == nil)
if SASL ~= nil and SASL ~= "" then
  assert(mt.macro(conn, SMFIC_MAIL, "{auth_authen}", SASL) == nil)
end
assert(mt.mailfrom(conn, SENDER) == nil)
assert(mt.macro(conn, SMFIC_RCPT, "{rcpt_mailer}", "smtp", "{rcpt_host}", "dane.test") == nil)
assert(mt.rcptto(conn, "<bob@dane.test>") == nil)
assert(mt.header(conn, "From", "a@sender.test") == nil)
assert(mt.header(conn, HNAME, HVALUE) == nil)
local e = mt.eom(conn)
if e ~= nil then
  mt.echo("NOREPLY " .. e)
  os.exit(3)
end
local r = mt.getreply(conn)
if r == SMFIR_ACCEPT then mt.echo("REPLY accept")
elseif r == SMFIR_CONTINUE then mt.echo("REPLY continue")
elseif r == SMFIR_TEMPFAIL then mt.echo("REPLY tempfail")
elseif r == SMFIR_REJECT then mt.echo("REPLY reject")
elseif r == SMFIR_REPLYCODE then mt.echo("REPLY replycode")
else mt.echo("REPLY other " .. tostring(r)) end
if mt.eom_check(conn, MT_HDRCHANGE, "Subject") then mt.echo("CHANGED Subject") end
if SUBJECT ~= nil and SUBJECT ~= "" and mt.eom_check(conn, MT_HDRCHANGE, "Subject", SUBJECT) then
  mt.echo("SUBJECT as expected")
end
for _, name in ipairs({"TLS-Required", "X-Original-TLS-Required", "X-RequireTLS-Route"}) do
  if mt.eom_check(conn, MT_HDRADD, name) then mt.echo("ADDED " .. name .. ": " .. tostring(mt.getheader(conn, name, 0))) end
  if mt.eom_check(conn, MT_HDRDELETE, name) then mt.echo("DELETED " .. name) end
end
mt.disconnect(conn)
